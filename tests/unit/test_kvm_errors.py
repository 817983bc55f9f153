import os

import pytest

from kvmkit.hypervisor import kvm as kvm_mod


def test_missing_device_says_how_to_fix(tmp_path):
    with pytest.raises(kvm_mod.KvmUnavailable, match="does not exist: load the kvm module"):
        kvm_mod.Kvm(str(tmp_path / "kvm"))


def test_no_access_says_how_to_fix(monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(kvm_mod.KvmUnavailable, match=r"no read/write access to /dev/kvm: .*usermod -aG kvm"):
        kvm_mod.Kvm()
