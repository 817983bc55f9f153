"""Example tables for `pytest --kvmkit-contract` (stdio would read the
terminal; the contract drives files, sockets and fed files)."""


def pytest_kvmkit_contract_configs(kind, tmp_path):
    if kind != "virtio-console":
        return None
    (tmp_path / "job").write_bytes(b"echo hi\n")
    return [
        {"backend": "file", "path": "hvc0.log"},
        {"backend": "socket", "path": "hvc0.sock",
         "ports": ["org.example.log=file:" + str(tmp_path / "port.log"),
                   "org.example.job=feed:" + str(tmp_path / "job"),
                   "org.example.ctl=socket:" + str(tmp_path / "ctl.sock"), "org.example.x=none"]},
        {"backend": "none", "multiport": False},
    ]
