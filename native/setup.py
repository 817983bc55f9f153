# The C sources (src/) are compiled at install time by cffi in API mode.
from setuptools import setup

setup(cffi_modules=["kvmkit_native/_build.py:ffibuilder"])
