"""A UNIX stream socket a device listens on for its host-side client (the
serial and virtio-console ``socket`` backends); exported by kvmkit.plugin_api."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from .plugin_api import DeviceError


def listen_unix_socket(path: Path, name: str) -> tuple[socket.socket, int]:
    """Listen at ``path`` (owner-only, non-blocking, backlog 1), replacing a
    stale socket file; a path another process listens on, or that is not a
    socket, is a DeviceError naming ``name``.  Returns the socket and the
    inode of its file (so that closing removes only our own file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise DeviceError(f"{name}: cannot use {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise DeviceError(f"{name}: {path} exists and is not a socket; "
                              "remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:           # nobody listens: a leftover, replace it
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DeviceError(f"{name}: cannot check whether {path} is in use: "
                              f"{e.strerror or e}") from None
        else:
            raise DeviceError(f"{name}: {path} is in use by a running listener "
                              "(another kvmkit?); choose another path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)                    # before listen(): nobody else can connect
        sock.listen(1)
        sock.setblocking(False)
        inode = os.lstat(path).st_ino
    except OSError as e:
        sock.close()
        raise DeviceError(f"{name}: cannot listen on {path}: {e.strerror or e}") from None
    return sock, inode
