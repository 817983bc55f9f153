"""Fast checks of the guest kit (guest/): no kernel build, no KVM."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "guest"
FRAGMENT = GUEST / "kernel.config"
BUILD_KIT = GUEST / "build-kit"
CHECK_CONFIG = GUEST / "check-config"
SPIN_SRC = GUEST / "spin-init.c"

OPTION_RE = re.compile(r"^CONFIG_[A-Z0-9_]+=(y|n|-?\d+|0x[0-9a-fA-F]+|\"[^\"]*\")$")
UNSET_RE = re.compile(r"^# CONFIG_[A-Z0-9_]+ is not set$")

# What the kit promises on top of tinyconfig (see guest/README.md).
REQUIRED = {
    "CONFIG_64BIT": "y",
    "CONFIG_SMP": "y",
    "CONFIG_NR_CPUS": "8",
    "CONFIG_HZ_100": "y",
    "CONFIG_PRINTK": "y",
    "CONFIG_PRINTK_TIME": "y",
    "CONFIG_EARLY_PRINTK": "y",
    "CONFIG_SERIAL_8250": "y",
    "CONFIG_SERIAL_8250_CONSOLE": "y",
    "CONFIG_SERIAL_8250_NR_UARTS": "4",
    "CONFIG_SERIAL_8250_RUNTIME_UARTS": "4",
    "CONFIG_RTC_CLASS": "y",
    "CONFIG_RTC_DRV_CMOS": "y",
    "CONFIG_RTC_HCTOSYS": "y",
    "CONFIG_RTC_HCTOSYS_DEVICE": '"rtc0"',
    "CONFIG_BLK_DEV_INITRD": "y",
    "CONFIG_DEVTMPFS": "y",
    "CONFIG_DEVTMPFS_MOUNT": "y",
    "CONFIG_EXT4_FS": "y",
    "CONFIG_PCI_MSI": "y",
    "CONFIG_VIRTIO_PCI": "y",
    "CONFIG_VIRTIO_BLK": "y",
    "CONFIG_VIRTIO_NET": "y",
    "CONFIG_IP_PNP_DHCP": "y",
    "CONFIG_NETCONSOLE": "y",
    "CONFIG_KVM_GUEST": "y",
    "CONFIG_X86_MPPARSE": "y",
    "CONFIG_X86_FEATURE_NAMES": "y",
    "CONFIG_PANIC_TIMEOUT": "0",
    "CONFIG_IPV6": "n",
    "CONFIG_FTRACE": "n",
    "CONFIG_MODULES": "n",
}


def parse_fragment(text: str) -> dict[str, str]:
    """Map option -> value ("n" for "is not set"); raise on a malformed line."""
    opts: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line:
            continue
        if UNSET_RE.match(line):
            key, val = line[2:].split(" ", 1)[0], "n"
        elif line.startswith("#"):
            # A plain comment must not look like a (mistyped) option line.
            if re.match(r"^#\s*CONFIG_", line):
                raise AssertionError(f"line {n}: comment that looks like an option: {raw!r}")
            continue
        elif OPTION_RE.match(line):
            key, val = line.split("=", 1)
        else:
            raise AssertionError(f"line {n}: not CONFIG_X=value or '# CONFIG_X is not set': {raw!r}")
        assert key not in opts, f"line {n}: {key} set twice"
        opts[key] = val
    return opts


def test_fragment_lines_are_well_formed():
    opts = parse_fragment(FRAGMENT.read_text())
    assert len(opts) > 40


def test_fragment_asks_for_what_the_kit_promises():
    opts = parse_fragment(FRAGMENT.read_text())
    missing = {k: v for k, v in REQUIRED.items() if opts.get(k) != v}
    assert not missing, f"fragment lacks or differs on: {missing}"


def test_parse_fragment_rejects_malformed_lines():
    for bad in ("CONFIG_FOO = y", "CONFIG_foo=y", "CONFIG_FOO=maybe", "#CONFIG_FOO is not set",
                "# CONFIG_FOO=y", "FOO=y"):
        with pytest.raises(AssertionError):
            parse_fragment(bad + "\n")


def run_check(tmp_path: Path, fragment: str, dotconfig: str) -> subprocess.CompletedProcess:
    frag = tmp_path / "frag"
    conf = tmp_path / "dotconfig"
    frag.write_text(fragment)
    conf.write_text(dotconfig)
    return subprocess.run([str(CHECK_CONFIG), str(frag), str(conf)], capture_output=True, text=True)


def test_check_config_accepts_a_matching_config(tmp_path):
    r = run_check(
        tmp_path,
        'CONFIG_A=y\nCONFIG_B=8\nCONFIG_C="rtc0"\n# CONFIG_D is not set\n# CONFIG_E is not set\n',
        'CONFIG_A=y\nCONFIG_B=8\nCONFIG_C="rtc0"\n# CONFIG_D is not set\nCONFIG_Z=y\n',
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == ""


def test_check_config_lists_every_option_that_did_not_take(tmp_path):
    r = run_check(
        tmp_path,
        "CONFIG_A=y\nCONFIG_B=8\n# CONFIG_D is not set\nCONFIG_MISSING=y\n",
        "# CONFIG_A is not set\nCONFIG_B=64\nCONFIG_D=y\n",
    )
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4
    assert "CONFIG_A: wanted y, got n" in r.stdout
    assert "CONFIG_B: wanted 8, got 64" in r.stdout
    assert "CONFIG_D: wanted n, got y" in r.stdout
    assert "CONFIG_MISSING: wanted y, got (missing)" in r.stdout


def test_build_kit_print_cache(tmp_path):
    env = dict(os.environ, KVMKIT_CACHE=str(tmp_path / "c"))
    r = subprocess.run([str(BUILD_KIT), "--print-cache"], env=env, capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.strip() == str(tmp_path / "c")


def test_build_kit_rejects_unknown_option(tmp_path):
    env = dict(os.environ, KVMKIT_CACHE=str(tmp_path / "c"))
    r = subprocess.run([str(BUILD_KIT), "--bogus"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown option" in r.stderr


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("objdump")), reason="needs gcc and objdump")
def test_spin_init_makes_no_system_call(tmp_path):
    exe = tmp_path / "init"
    subprocess.run(
        ["gcc", "-static", "-nostdlib", "-O2", "-fno-pie", "-no-pie", "-fno-stack-protector",
         "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none", "-o", str(exe), str(SPIN_SRC)],
        check=True,
    )
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], check=True,
                         capture_output=True, text=True).stdout
    insns = [ln.split("\t", 1)[1].strip() for ln in dis.splitlines() if re.match(r"^\s+[0-9a-f]+:\t", ln)]
    assert insns, dis
    assert any(i.startswith("pause") for i in insns), dis
    for insn in insns:
        mnemonic = insn.split()[0]
        assert mnemonic not in ("syscall", "sysenter", "int", "int3", "int1", "into", "vmcall", "vmmcall"), dis
    # Static, and entered at _start.
    hdr = subprocess.run(["readelf", "-lh", str(exe)], check=True, capture_output=True, text=True).stdout
    assert "INTERP" not in hdr
    assert "EXEC" in hdr


def _cloud_kernel_present() -> bool:
    return any(Path("/boot").glob("vmlinuz-*-cloud-amd64"))


def _cpio_list(path: Path) -> list[str]:
    out = subprocess.run(["cpio", "-itv", "--quiet"], stdin=path.open("rb"), check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


@pytest.mark.skipif(
    not (shutil.which("busybox") and shutil.which("cpio") and shutil.which("gcc") and _cloud_kernel_present()),
    reason="needs busybox-static, cpio, gcc and linux-image-cloud-amd64 installed",
)
@pytest.mark.skipif(os.geteuid() != 0 and not shutil.which("fakeroot"), reason="needs root or fakeroot")
def test_build_kit_no_kernel(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, KVMKIT_CACHE=str(cache))
    r = subprocess.run([str(BUILD_KIT), "--no-kernel"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    busybox_cpio = cache / "initramfs" / "busybox.cpio"
    spin_cpio = cache / "initramfs" / "spin.cpio"
    tools_cpio = cache / "initramfs" / "tools.cpio"
    assert busybox_cpio.is_file() and spin_cpio.is_file() and tools_cpio.is_file()
    for img in (busybox_cpio, spin_cpio, tools_cpio):
        assert img.read_bytes()[:6] == b"070701", "not an uncompressed newc archive"

    bb = _cpio_list(busybox_cpio)
    names = {ln.split()[-1] if " -> " not in ln else ln.split(" -> ")[0].split()[-1] for ln in bb}
    for want in ("init", "bin/busybox", "bin/sh", "proc", "sys", "dev", "dev/console", "mnt",
                 "etc/kvmkit/start.sh", "etc/kvmkit/tests.sh", "etc/kvmkit/report.sh",
                 "etc/kvmkit/shell.sh", "etc/acpi/PWRF/00000080", "bin/kvmkit-rand", "root/.profile"):
        assert want in names, f"{want} missing from busybox.cpio"
    for script in ("etc/kvmkit/start.sh", "etc/kvmkit/tests.sh", "etc/kvmkit/report.sh",
                   "etc/kvmkit/shell.sh", "etc/acpi/PWRF/00000080", "bin/kvmkit-rand"):
        assert next(ln for ln in bb if ln.endswith(" " + script)).startswith("-rwx"), script
    console = next(ln for ln in bb if ln.endswith(" dev/console"))
    assert console.startswith("c") and "5,   1" in console
    assert all(" root     root " in ln for ln in bb), "entries not owned by 0:0"
    assert "bin/kvmkit-io" not in names, "the bench's load generator belongs in tools.cpio"
    assert busybox_cpio.stat().st_size < 2_300_000, "every test guest unpacks busybox.cpio: keep it small"

    # kvmkit-rand writes the stream tests/integration/guest.py predicts.
    rand = cache / "build" / "stage" / "busybox" / "bin" / "kvmkit-rand"
    out = subprocess.run([str(rand), "0x2a", "100003"], capture_output=True, check=True).stdout
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from guest import seeded_bytes
    assert out == seeded_bytes(42, 100003)
    assert subprocess.run([str(rand), "x", "1"], capture_output=True).returncode == 2

    tl = _cpio_list(tools_cpio)
    assert any(ln.startswith("-rwx") and ln.endswith(" bin/kvmkit-io") for ln in tl), tl

    sp = _cpio_list(spin_cpio)
    assert any(ln.startswith("-rwx") and ln.endswith(" init") for ln in sp)
    assert any(ln.startswith("c") and ln.endswith(" dev/console") for ln in sp)

    demo = tomllib.loads((cache / "demo.toml").read_text())
    assert demo["machine"]["vcpus"] == 2
    assert demo["kernel"]["image"] == "kernels/acpi/vmlinux"      # poweroff is ACPI S5
    assert (cache / demo["kernel"]["initrd"]).is_file()
    assert "nopv" not in demo["kernel"]["cmdline"]
    assert [d["kind"] for d in demo["device"]] == ["serial8250", "rtc", "i8042"]

    env_lines = dict(
        ln.split("=", 1) for ln in (cache / "kit.env").read_text().splitlines() if ln and not ln.startswith("#")
    )
    for key in ("SMALL_VMLINUX", "SMALL_BZIMAGE", "DEBIAN_BZIMAGE", "BUSYBOX_CPIO", "SPIN_CPIO", "TOOLS_CPIO", "DEMO_TOML"):
        assert key in env_lines
    assert Path(env_lines["BUSYBOX_CPIO"]) == busybox_cpio
    assert Path(env_lines["DEBIAN_BZIMAGE"]).read_bytes()[0x202:0x206] == b"HdrS"
    assert not (cache / "kernels" / "small").exists(), "--no-kernel must not build the kernel"

    # kit.env is shell-sourceable.
    r = subprocess.run(["bash", "-c", f". {cache / 'kit.env'} && test -f \"$SPIN_CPIO\" && echo ok"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr


# -- the kernel patch ---------------------------------------------------------------

PATCH = GUEST / "pvm-user-syscall.patch"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")


def test_patch_names_the_symbol_build_kit_checks():
    header = PATCH.read_text().split("\n--- a/", 1)[0]
    symbols = re.findall(r"^Check-symbol: *(\w+)$", header, re.M)
    assert symbols == ["kvmkit_user_syscall_fault"]
    assert f"+static noinstr bool {symbols[0]}(" in PATCH.read_text()
    assert '"$HERE/pvm-user-syscall.patch"' in BUILD_KIT.read_text()


@pytest.mark.skipif(not SOURCE_TARBALL.is_file() or not shutil.which("patch"),
                    reason="needs linux-source-6.1 and patch installed")
def test_patch_applies_to_debian_linux_source(tmp_path):
    member = "linux-source-6.1/arch/x86/mm/fault.c"
    subprocess.run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp_path), member], check=True, timeout=300)
    src = tmp_path / "linux-source-6.1"
    r = subprocess.run(["patch", "-p1", "--forward", "--batch"], stdin=PATCH.open("rb"), cwd=src,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    patched = (src / "arch/x86/mm/fault.c").read_text()
    hook = patched.index("if (kvmkit_user_syscall_fault(regs, error_code, address))")
    # The check comes first in exc_page_fault, before any of the handler's own work.
    entry = patched.index("DEFINE_IDTENTRY_RAW_ERRORCODE(exc_page_fault)")
    assert entry < hook < patched.index("prefetchw(&current->mm->mmap_lock)", entry)
    # Applying it twice fails loudly rather than stacking a second copy.
    again = subprocess.run(["patch", "-p1", "--forward", "--batch", "--dry-run"], stdin=PATCH.open("rb"),
                           cwd=src, capture_output=True, text=True)
    assert again.returncode != 0
