"""cffi (API mode) build of the C queue code in ../src, compiled at install
time with the system C compiler."""
import os
from pathlib import Path

from cffi import FFI

SRC = Path(__file__).resolve().parent.parent / "src"
_REL = os.path.relpath(SRC)             # setuptools wants paths relative to setup.py
HEADERS = ("vq.h", "irq.h", "engine.h", "blk.h", "net.h")
SOURCES = ("vq.c", "irq.c", "engine.c", "blk.c", "net.c")


def _declarations() -> str:
    """The headers' declarations, without the preprocessor lines cffi cannot read."""
    out = []
    for name in HEADERS:
        for line in (SRC / name).read_text().splitlines():
            words = line.split()
            if line.startswith("#") and not (words[0] == "#define" and len(words) >= 3):
                continue                      # include guards, #include, #ifndef...
            out.append(line)
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(_declarations())
ffibuilder.set_source(
    "kvmkit_native._native",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=[os.path.join(_REL, s) for s in SOURCES],
    include_dirs=[_REL],
    depends=[os.path.join(_REL, h) for h in HEADERS],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
