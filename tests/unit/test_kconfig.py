"""A kernel image's embedded config (IKCONFIG), in an ELF vmlinux and in a
bzImage's compressed payload, and what `kvmkit check --kernel` says of it."""
import gzip

import pytest

from kvmkit.boot import kconfig
from kvmkit.cli import main
from test_boot_images import compress, make_bzimage, tiny_vmlinux

GOOD = "".join(f"CONFIG_{n}=y\n" for n, _ in kconfig.REQUIRED + kconfig.OPTIONAL)


def with_config(image: bytes, text: str) -> bytes:
    return image + b"\0" * 64 + kconfig.START + gzip.compress(text.encode()) + kconfig.END + b"\0" * 16


def test_found_in_a_vmlinux():
    image = with_config(tiny_vmlinux(), "# comment\nCONFIG_A=y\nCONFIG_B=\"x\"\n# CONFIG_C is not set\n")
    text = kconfig.embedded_config(image, "vmlinux")
    assert kconfig.parse(text) == {"A": "y", "B": '"x"'}


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_found_in_a_bzimage_payload(kind):
    image = make_bzimage(compress(kind, with_config(tiny_vmlinux(), GOOD)))
    assert kconfig.parse(kconfig.embedded_config(image, "bzImage"))["VIRTIO_FS"] == "y"


def test_none_embedded():
    assert kconfig.embedded_config(tiny_vmlinux(), "vmlinux") is None


@pytest.mark.parametrize("image, words", [
    (tiny_vmlinux() + kconfig.START + b"junk", "no end marker"),
    (tiny_vmlinux() + kconfig.START + b"not gzip" + kconfig.END, "does not inflate"),
    (b"MZ" + bytes(4096), "neither a bzImage nor an ELF"),
])
def test_damaged_images(image, words):
    with pytest.raises(kconfig.KconfigError, match=words):
        kconfig.embedded_config(image, "k")


def test_verdict_names_what_is_missing_and_modules():
    options = kconfig.parse(GOOD.replace("CONFIG_VIRTIO_FS=y", "CONFIG_VIRTIO_FS=m")
                            .replace("CONFIG_FUSE_FS=y\n", "").replace("CONFIG_OVERLAY_FS=y\n", ""))
    v = kconfig.check_options(options)
    assert not v.ok
    assert v.missing == ("CONFIG_VIRTIO_FS (=m, a module: no initramfs loads it)", "CONFIG_FUSE_FS")
    assert v.missing_optional == ("CONFIG_OVERLAY_FS (--overlay-rwdir)",)
    assert kconfig.check_options(kconfig.parse(GOOD)).ok


def test_check_kernel_names_every_missing_option_in_one_line(tmp_path, capsys):
    k = tmp_path / "vmlinux"
    k.write_bytes(with_config(tiny_vmlinux(), GOOD.replace("CONFIG_VIRTIO_CONSOLE=y\n", "")
                              .replace("CONFIG_DEVTMPFS=y\n", "")))
    assert main(["check", "--kernel", str(k)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CONFIG_VIRTIO_CONSOLE, CONFIG_DEVTMPFS" in err[0] and str(k) in err[0]


def test_check_kernel_ok_and_without_embedded_config(tmp_path, capsys):
    k = tmp_path / "vmlinux"
    k.write_bytes(with_config(tiny_vmlinux(), GOOD))
    assert main(["check", "--kernel", str(k)]) == 0
    assert "has every option kvmkit sandbox needs" in capsys.readouterr().out
    k.write_bytes(tiny_vmlinux())
    assert main(["check", "--kernel", str(k)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "has no embedded config (CONFIG_IKCONFIG is off)" in out[1] and "CONFIG_VIRTIO_FS" in out[1]
