"""guest/build-kit's progress and failure reports, with the slow tools faked.

A fake ``tar`` unpacks a stand-in source tree, a fake ``make`` prints kbuild
step lines (or fails the way a real build fails), a fake ``df`` reports a
nearly full disk: the script itself runs for real, in a throwaway cache, and
no kernel is built.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_KIT = ROOT / "guest" / "build-kit"
TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
CHECK_SYMBOLS = sorted({m for p in (ROOT / "guest").glob("*.patch")
                        for m in re.findall(r"^Check-symbol: *(\S+)", p.read_text(), re.M)})

pytestmark = [
    pytest.mark.skipif(not TARBALL.exists(), reason="needs linux-source-6.1 (scripts/setup installs it)"),
    pytest.mark.skipif(not (shutil.which("busybox") and shutil.which("cpio") and shutil.which("gcc")),
                       reason="needs busybox-static, cpio and gcc"),
    pytest.mark.skipif(not any(Path("/boot").glob("vmlinuz-*-cloud-amd64")),
                       reason="needs linux-image-cloud-amd64"),
    pytest.mark.skipif(os.geteuid() != 0 and not shutil.which("fakeroot"), reason="needs root or fakeroot"),
]

FAKES = {
    # tar -xJf TARBALL -C DIR: a source tree with just what build-kit touches.
    "tar": r"""
        dir=$4
        if [ "${FAKE_TAR:-}" = nospace ]; then
            echo "tar: linux-source-6.1/drivers/gpu/x.c: Cannot write: No space left on device" >&2; exit 2
        fi
        mkdir -p "$dir/linux-source-6.1/scripts/kconfig"
        echo "# fake" > "$dir/linux-source-6.1/Makefile"
        printf '#!/bin/sh\ncat "$3" >> "$2"\n' > "$dir/linux-source-6.1/scripts/kconfig/merge_config.sh"
        chmod +x "$dir/linux-source-6.1/scripts/kconfig/merge_config.sh"
    """,
    "patch": "cat > /dev/null",
    # make -C SRC [-jN] TARGETS, or make -s -C SRC kernelversion
    "make": r"""
        src=; targets=
        while [ $# -gt 0 ]; do
            case $1 in -C) src=$2; shift ;; -j*|-s) ;; *) targets="$targets $1" ;; esac
            shift
        done
        case $targets in
            *tinyconfig*) : > "$src/.config"; echo "  HOSTCC  scripts/basic/fixdep"; exit 0 ;;
            *olddefconfig*) echo "#"; exit 0 ;;
            *kernelversion*) echo 6.1.999; exit 0 ;;
        esac
        i=0
        while [ $i -lt "${FAKE_STEPS:-20}" ]; do
            i=$((i + 1))
            echo "  CC      drivers/fake/obj$i.o"
            [ -n "${FAKE_STEP_DELAY:-}" ] && sleep "$FAKE_STEP_DELAY"
            if [ "${FAKE_MAKE:-}" = fail ] && [ $i -eq 5 ]; then
                echo "drivers/fake/obj5.c:12:1: error: expected ';' before '}' token" >&2
                echo "make[3]: *** [scripts/Makefile.build:250: drivers/fake/obj5.o] Error 1" >&2
                echo "make: *** [Makefile:1992: drivers] Error 2" >&2
                exit 2
            fi
            if [ "${FAKE_MAKE:-}" = nospace ] && [ $i -eq 5 ]; then
                echo "drivers/fake/obj5.o: No space left on device" >&2
                echo "make: *** [Makefile:1992: drivers] Error 2" >&2
                exit 2
            fi
        done
        mkdir -p "$src/arch/x86/boot"
        echo vmlinux > "$src/vmlinux"
        echo bzImage > "$src/arch/x86/boot/bzImage"
    """,
    "nm": r"""for s in $FAKE_NM_SYMBOLS; do echo "ffffffff81001000 T $s"; done""",
    # df -Pk DIR: the real df, or a disk with FAKE_DF_FREE_KB left.
    "df": r"""
        if [ -z "${FAKE_DF_FREE_KB:-}" ]; then exec /usr/bin/df "$@"; fi
        echo "Filesystem     1024-blocks     Used Available Capacity Mounted on"
        echo "/dev/fake         10000000  9999000 $FAKE_DF_FREE_KB 100% /"
    """,
}


@pytest.fixture
def kit(tmp_path):
    """Runs build-kit with the fake tools first on PATH; returns a runner."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        f = bin_dir / name
        f.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        f.chmod(0o755)
    cache = tmp_path / "cache"

    def run(*args, timeout=600, **env):
        full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", KVMKIT_CACHE=str(cache),
                    FAKE_NM_SYMBOLS=" ".join(CHECK_SYMBOLS), KVMKIT_BUILD_STEPS="50", **env)
        t0 = time.monotonic()
        r = subprocess.run([str(BUILD_KIT), *args], env=full, capture_output=True, text=True,
                           timeout=timeout)
        r.elapsed = time.monotonic() - t0
        return r

    run.cache = cache
    return run


def test_progress_lines_when_not_a_terminal(kit):
    r = kit("--brief", FAKE_STEPS="40", FAKE_STEP_DELAY="0.1", KVMKIT_PROGRESS_EVERY="1")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # The first build has no timing yet: the built-in estimate of the steps.
    progress = re.findall(r"^build-kit: small kernel: (\d+)/~50 steps \((\d+)%\), (\d+)s", out, re.M)
    assert len(progress) >= 2, out
    done = [int(p[0]) for p in progress]
    assert done == sorted(done) and done[-1] > 0
    assert "\r" not in out, "no in-place updates when stdout is not a terminal"
    assert re.search(r"^build-kit: built the small kernel in \d+s \(40 steps\)$", out, re.M), out
    assert re.search(r"^build-kit: extracting the small kernel's source: ", out, re.M), out
    assert "build-kit: assembling the initramfs images" in out
    # One summary line with --brief.
    assert out.rstrip().splitlines()[-1].startswith(f"build-kit: guest kit ready in {kit.cache.resolve()}")
    # The build was timed for next time.
    assert (kit.cache / "kernels" / "small" / "timing").read_text().splitlines()[:2] == ["seconds=" + re.search(
        r"built the small kernel in (\d+)s", out).group(1), "steps=40"]


def test_progress_estimate_from_last_build(kit):
    # What an earlier full build here recorded (test_progress_lines_when_not_a_terminal
    # checks that a build records it).
    for name in ("small", "acpi"):
        (kit.cache / "kernels" / name).mkdir(parents=True)
        (kit.cache / "kernels" / name / "timing").write_text("seconds=75\nsteps=40\njobs=2\n")
    r = kit("--brief", FAKE_STEPS="40", FAKE_STEP_DELAY="0.1", KVMKIT_PROGRESS_EVERY="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^build-kit: building the small kernel \(make -j\d+ vmlinux bzImage; last build here took 1m15s;",
                     r.stdout, re.M), r.stdout
    # Now the total is this machine's last build, and an estimate appears.
    assert re.search(r"^build-kit: small kernel: \d+/~40 steps \(\d+%\), \d+s, about \d+s left$", r.stdout, re.M), r.stdout


def test_progress_in_place_on_a_terminal(kit, tmp_path):
    script = shutil.which("script")
    if not script:
        pytest.skip("needs script(1) for a pseudo-terminal")
    log = tmp_path / "tty.log"
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", KVMKIT_CACHE=str(kit.cache),
               FAKE_NM_SYMBOLS=" ".join(CHECK_SYMBOLS), FAKE_STEPS="30", FAKE_STEP_DELAY="0.1",
               KVMKIT_BUILD_STEPS="50")
    r = subprocess.run([script, "-qec", f"{BUILD_KIT} --brief", str(log)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = log.read_bytes().decode(errors="replace")
    updates = re.findall(r"\r\x1b\[Kbuild-kit: small kernel: \d+/~\d+ steps", out)
    assert len(updates) >= 2, out
    # The in-place line is cleared before the next line is printed.
    assert "\r\x1b[Kbuild-kit: built the small kernel in " in out, out


def test_failed_build_shows_the_log_tail_and_one_line(kit):
    r = kit(FAKE_MAKE="fail")
    assert r.returncode == 1
    err = r.stderr.splitlines()
    log = kit.cache.resolve() / "build" / "kernel-build.log"
    assert err[-1] == ("build-kit: error: the small kernel build failed "
                       f"(the log's last lines are above; whole log: {log})"), r.stderr
    assert "    drivers/fake/obj5.c:12:1: error: expected ';' before '}' token" in err
    assert "    make: *** [Makefile:1992: drivers] Error 2" in err
    # The tail is the errors, not the step lines that scrolled before them.
    assert not any("  CC  " in ln for ln in err), r.stderr


def test_no_space_before_extracting(kit):
    r = kit(FAKE_DF_FREE_KB="512000")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("build-kit: error: no space left in the kit cache: the small kernel's source "
                               "and build tree needs about 1800 MB and "), lines[0]
    assert "has 500 MB free; free some space there or set KVMKIT_CACHE" in lines[0]


def test_no_space_during_the_build(kit):
    r = kit(FAKE_MAKE="nospace")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"build-kit: error: no space left in the kit cache {kit.cache.resolve()} "
                               "while building the small kernel"), lines[0]
    assert "set KVMKIT_CACHE to a disk with room" in lines[0]


def test_no_space_while_extracting(kit):
    r = kit(FAKE_TAR="nospace")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "no space left in the kit cache" in lines[0] and "while extracting the small kernel's source" in lines[0]
    assert not (kit.cache / "build" / "linux-source-6.1").exists(), "a half-extracted tree is removed"


@pytest.mark.skipif(os.geteuid() != 0, reason="build-kit installs packages only as root")
def test_package_index_unreachable(kit, tmp_path):
    fakes = {
        # busybox-static is missing; everything else is installed.
        "dpkg-query": 'for a; do p=$a; done\n[ "$p" = busybox-static ] && { printf "unknown ok not-installed"; exit 0; }\n'
                      'printf "install ok installed"\n',
        "apt-get": 'echo "Err:1 http://deb.debian.org/debian bookworm InRelease"\n'
                   'echo "  Temporary failure resolving \'deb.debian.org\'"\n'
                   '[ "$1" = update ] && exit 0\n'
                   'echo "E: Unable to locate package busybox-static" >&2\nexit 100\n',
    }
    for name, body in fakes.items():
        (tmp_path / "bin" / name).write_text("#!/bin/sh\n" + body)
        (tmp_path / "bin" / name).chmod(0o755)
    r = kit("--no-kernel")
    assert r.returncode == 1
    log = kit.cache.resolve() / "build" / "apt.log"
    assert r.stderr.splitlines() == [
        "build-kit: error: the package index is unreachable (Temporary failure resolving 'deb.debian.org'): "
        f"check the network and the mirror/proxy in /etc/apt, then run again (log: {log})"], r.stderr
