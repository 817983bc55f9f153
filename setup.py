# The KVM bindings are a cffi extension compiled at install time against <linux/kvm.h>.
from setuptools import setup

setup(cffi_modules=["core/hypervisor/_kvm_build.py:ffibuilder"])
