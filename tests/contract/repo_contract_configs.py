"""Example tables for the contract runs of this repository's plugins whose
own test folders do not provide them (a pytest plugin: ``-p repo_contract_configs``)."""


def pytest_kvmkit_contract_configs(kind, tmp_path):
    if kind != "virtio-blk":
        return None
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    (tmp_path / "small.img").write_bytes(bytes(64 << 10))
    return [{"path": "disk.img"},
            {"path": "disk.img", "readonly": True, "serial": "contract"},
            {"path": "small.img", "discard": False}]
