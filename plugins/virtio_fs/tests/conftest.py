"""Fixtures of the virtio-fs tests: a FUSE server on a tmp dir, a protocol
client, and the server mounted on the host through /dev/fuse."""
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fuseclient import Client, server_transport  # noqa: E402
from kvmkit_virtio_fs.fuse_dev import FuseMount, MountError  # noqa: E402
from kvmkit_virtio_fs.fuse_server import FuseServer  # noqa: E402


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def make_client(share):
    """make_client(**server_kw) -> (client, server), INIT done."""
    made = []

    def make(root=None, **kw):
        server = FuseServer(root or share, **kw)
        made.append(server)
        client = Client(server_transport(server))
        client.init()
        return client, server
    yield make
    for s in made:
        s.close()


@pytest.fixture
def client(make_client):
    return make_client()[0]


def _can_mount() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (modprobe fuse)"
    if os.geteuid() != 0:
        return "mounting FUSE directly needs root (CAP_SYS_ADMIN)"
    return None


@pytest.fixture
def mount(tmp_path):
    """mount(root, **server_kw) -> (mountpoint, server): the server on the host
    kernel's FUSE client; unmounted (lazily) at teardown whatever happened."""
    why = _can_mount()
    if why:
        if os.environ.get("KVMKIT_REQUIRE_FUSE") == "1":
            pytest.fail(why)
        pytest.skip(why)
    mounts = []

    def make(root, **kw):
        mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        server = FuseServer(root, **kw)
        try:
            m = FuseMount(server, mnt).start()
        except MountError as e:
            server.close()
            pytest.skip(str(e))
        mounts.append((m, server))
        return mnt, server
    yield make
    errors = []
    for m, server in reversed(mounts):
        try:
            m.close()
        except RuntimeError as e:
            errors.append(e)
        server.close()
    if errors:
        raise errors[0]


def pytest_kvmkit_contract_configs(kind, tmp_path):
    if kind != "virtio-fs":
        return None
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "file").write_text("contract")
    (tmp_path / "ro").mkdir()
    return [{"path": "share"},
            {"path": "ro", "readonly": True, "tag": "contract-ro", "cache": "never"},
            {"path": "share", "xattr": True, "request_queues": 2, "cache": "always"}]
