"""A host-side peer for a guest's network transfers: an HTTP server with a
random blob the guest fetches, and a TCP sink for a file of kvmkit-rand
bytes the guest sends (test_virtio_net over a tap, test_userspace over
slirp)."""
import hashlib
import http.server
import os
import secrets
import socket
import threading

from guest import seeded_bytes

OUT_SIZE = 512 * 1024


class Transfer:
    """A host HTTP server with a random blob for the guest to fetch, and a TCP
    sink for a random file the guest sends; the guest's hook prints both md5s."""

    def __init__(self, d, address: str, make_socket=socket.socket):
        """Serve ``d`` (where the blob is written) and take the guest's file on
        ``address``; ``make_socket`` makes the sockets (in a network namespace
        for the tap test)."""
        self.blob = os.urandom(1 << 20)
        self.seed = secrets.randbits(63)        # what the guest sends: kvmkit-rand's bytes
        (d / "blob").write_bytes(self.blob)
        self.received = bytearray()
        self.done = threading.Event()

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(d), **kw)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer((address, 0), Quiet, bind_and_activate=False)
        self.httpd.socket = make_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.httpd.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.httpd.server_bind()
        self.httpd.server_activate()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.sink = make_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sink.bind((address, 0))
        self.sink.listen(1)
        self.sink.settimeout(1)                 # polls: the sink waits until close()
        self.closed = threading.Event()
        threading.Thread(target=self._take, daemon=True).start()

    @property
    def http_port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def sink_port(self) -> int:
        return self.sink.getsockname()[1]

    def _take(self):
        """Take the guest's file: all of it, then close (busybox nc ends on
        EOF).  No deadline of its own: a loaded guest sent its file over 900 s
        after the sink opened, into a sink that had stopped accepting, and nc
        blocked on the full connection.  The guest's run has the deadline;
        close() ends the wait."""
        conn = self._wait(lambda: self.sink.accept()[0])
        if conn is None:
            return
        with conn as c:
            c.settimeout(1)
            while len(self.received) < OUT_SIZE and (chunk := self._wait(lambda: c.recv(65536))):
                self.received.extend(chunk)
        self.done.set()

    def _wait(self, call):
        """``call()``'s result, retried on its 1 s timeout until close(); None
        once closed or on a socket error."""
        while not self.closed.is_set():
            try:
                return call()
            except TimeoutError:
                continue
            except OSError:
                return None
        return None

    def hook(self, host: str) -> str:
        return (f"#!/bin/sh\n"
                f"wget -q -O /tmp/in http://{host}:{self.http_port}/blob\n"
                f"echo \"kvmkit-guest: net-in $(md5sum /tmp/in | cut -d' ' -f1)\"\n"
                f"kvmkit-rand {self.seed} {OUT_SIZE} > /tmp/out\n"
                f"echo \"kvmkit-guest: net-out $(md5sum /tmp/out | cut -d' ' -f1)\"\n"
                f"nc -w 10 {host} {self.sink_port} < /tmp/out\n"
                f"touch /tmp/kvmkit-no-reset\n")   # the test stops the VM

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def close(self):
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.sink.close()

    def check(self, result):
        got = result.find(r"kvmkit-guest: net-in ([0-9a-f]{32})")
        assert got, result.describe()
        assert got[1][1] == hashlib.md5(self.blob).hexdigest()
        sent = result.find(r"kvmkit-guest: net-out ([0-9a-f]{32})")
        assert sent, result.describe()
        assert len(self.received) == OUT_SIZE and hashlib.md5(self.received).hexdigest() == sent[1][1]
        assert bytes(self.received) == seeded_bytes(self.seed, OUT_SIZE)
