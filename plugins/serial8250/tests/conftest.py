"""Example tables for `pytest --kvmkit-contract` (the default backend, stdio,
would put a terminal into raw mode; the contract drives the other two)."""


def pytest_kvmkit_contract_configs(kind, tmp_path):
    if kind != "serial8250":
        return None
    return [
        {"backend": "file", "path": "console.log"},
        {"backend": "socket", "path": "ttyS0.sock"},
        {"port": 0x2F8, "backend": "file", "path": "com2.log"},
        {"port": 0x3E0, "irq": 5, "backend": "file", "path": "odd.log"},
    ]
