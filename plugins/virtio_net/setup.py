"""The libslirp binding is a cffi extension compiled at install time against
<slirp/libslirp.h> (Debian: libslirp-dev).  Without the header the plugin
installs without it: the tap backend works, ``backend = "user"`` says what to
install."""
import os
import sys

from setuptools import setup

HEADER_DIRS = ("/usr/include", "/usr/local/include")


def have_slirp_header() -> bool:
    extra = [d for d in os.environ.get("CPATH", "").split(":") if d]
    return any(os.path.isfile(os.path.join(d, "slirp", "libslirp.h"))
               for d in (*extra, *HEADER_DIRS))


if have_slirp_header():
    setup(cffi_modules=["kvmkit_virtio_net/_slirp_build.py:ffibuilder"])
else:
    print("kvmkit-virtio-net: <slirp/libslirp.h> not found (apt-get install libslirp-dev): "
          "building without user-mode networking", file=sys.stderr)
    setup()
