"""User-mode networking: a Python face for one libslirp instance.

libslirp (the TCP/IP engine of QEMU's ``-netdev user``) is a whole virtual
network inside the VMM process: it answers the guest's ARP, DHCP and DNS,
and turns the guest's TCP and UDP flows into ordinary host sockets, so no
privilege is needed.  Its defaults here are QEMU's: network 10.0.2.0/24, the
host (gateway) 10.0.2.2, which also stands for the host's loopback, DNS
10.0.2.3, DHCP leases from 10.0.2.15.  IPv4 only.

libslirp is not thread-safe: every call into it holds :attr:`Slirp.lock`.
Its callbacks run on the thread that made that call, with the lock held, so
they must not call back into slirp; ``send`` (a frame for the guest) only
queues the frame.

One thread runs :meth:`Slirp.run`, the event loop slirp needs: it asks
slirp which sockets to watch (``slirp_pollfds_fill``), waits in ``poll``,
hands the results back (``slirp_pollfds_poll``: slirp reads the host
sockets, runs its TCP timers and sends frames to the guest) and fires
slirp's own timers.  Guest frames come in through :meth:`input` on any thread.
"""
from __future__ import annotations

import importlib
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable

from .forward import Forward

__all__ = ["Slirp", "SlirpError", "SlirpUnavailable", "binding", "NETWORK", "NETMASK", "HOST",
           "DHCP_START", "NAMESERVER", "MTU_MIN", "MTU_MAX"]

NETWORK, NETMASK = "10.0.2.0", "255.255.255.0"
HOST, DHCP_START, NAMESERVER = "10.0.2.2", "10.0.2.15", "10.0.2.3"
MTU_MIN, MTU_MAX = 68, 65521        # libslirp's IF_MTU_MIN / IF_MTU_MAX
MAX_WAIT_MS = 1000                  # poll at least this often (TCP timers run from poll)

INSTALL_HINT = ("install it (Debian: apt-get install libslirp0 libslirp-dev) and reinstall "
                "the plugin (pip install -e plugins/virtio_net), or use backend = \"tap\"")


class SlirpError(Exception):
    """libslirp refused something (the message says what)."""


class SlirpUnavailable(SlirpError):
    """The libslirp binding is not built or libslirp is not installed."""


_binding = None


def binding():
    """``(ffi, lib)`` of the compiled binding, its callbacks registered.
    SlirpUnavailable if it was never built (no libslirp-dev at install
    time) or libslirp.so.0 cannot be loaded."""
    global _binding
    if _binding is None:
        try:
            _slirp = importlib.import_module(f"{__package__}._slirp")
        except ImportError as e:
            why = str(e) if "libslirp" in str(e) else "the plugin was installed without it"
            raise SlirpUnavailable(f"libslirp is not available ({why}): {INSTALL_HINT}") from None
        _register_callbacks(_slirp.ffi)
        _binding = (_slirp.ffi, _slirp.lib)
    return _binding


def _inet(addr: str) -> int:
    """An IPv4 address as the int whose memory bytes are in network order."""
    return struct.unpack("=I", socket.inet_aton(addr))[0]


# select.poll flags <-> SLIRP_POLL_* flags
def _poll_maps(lib):
    to_poll = ((lib.SLIRP_POLL_IN, select.POLLIN), (lib.SLIRP_POLL_OUT, select.POLLOUT),
               (lib.SLIRP_POLL_PRI, select.POLLPRI))
    from_poll = ((select.POLLIN, lib.SLIRP_POLL_IN), (select.POLLOUT, lib.SLIRP_POLL_OUT),
                 (select.POLLPRI, lib.SLIRP_POLL_PRI), (select.POLLERR, lib.SLIRP_POLL_ERR),
                 (select.POLLHUP, lib.SLIRP_POLL_HUP), (select.POLLNVAL, lib.SLIRP_POLL_ERR))
    return to_poll, from_poll


class Slirp:
    """One virtual network.  ``send(frame)`` receives every Ethernet frame
    slirp has for the guest (on whichever thread is inside slirp)."""

    def __init__(self, send: Callable[[bytes], None], *, mtu: int = 1500,
                 hostname: str | None = None, log: logging.Logger | None = None,
                 outbound: bool = True, host_loopback: bool = True):
        """``outbound=False``: the guest reaches nothing beyond slirp itself
        (DHCP and the port forwards still work; DNS does not: it is outbound);
        ``host_loopback=False``: 10.0.2.2 no longer stands for the host's
        127.0.0.1, so the guest cannot reach services that listen only there."""
        ffi, lib = binding()
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise SlirpError(f"mtu {mtu} is outside what libslirp supports ({MTU_MIN}-{MTU_MAX})")
        self.ffi, self.lib = ffi, lib
        self.log = log or logging.getLogger(__name__)
        self.lock = threading.Lock()
        self._send = send
        self._to_poll, self._from_poll = _poll_maps(lib)
        self._poll_fds: list[tuple[int, int]] = []      # (fd, select events) of this round
        self._revents: list[int] = []
        self._timers: dict[int, list] = {}               # id -> [fire, expire_ms | None]
        self._timer_ids = itertools.count(1)
        self._guest_errors = 0
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._timeout = ffi.new("uint32_t *")
        self._handle = ffi.new_handle(self)
        self._keep: list = []                            # C strings slirp points at

        cfg = ffi.new("SlirpConfig *")
        cfg.version = min(4, lib.SLIRP_CONFIG_VERSION_MAX)
        cfg.restricted = 0 if outbound else 1   # 1: drop every connection the guest opens
        cfg.in_enabled = True
        cfg.vnetwork.s_addr = _inet(NETWORK)
        cfg.vnetmask.s_addr = _inet(NETMASK)
        cfg.vhost.s_addr = _inet(HOST)
        cfg.in6_enabled = False
        cfg.vdhcp_start.s_addr = _inet(DHCP_START)
        cfg.vnameserver.s_addr = _inet(NAMESERVER)
        cfg.if_mtu = mtu
        cfg.if_mru = mtu
        cfg.disable_host_loopback = not host_loopback   # else 10.0.2.2 reaches the host's 127.0.0.1
        cfg.enable_emu = False                 # slirp's protocol rewriting: unsafe, off
        if hostname:
            name = ffi.new("char[]", hostname.encode("utf-8")[:32])
            self._keep.append(name)
            cfg.vhostname = name
        cb = ffi.new("SlirpCb *")
        cb.send_packet = lib.kvmkit_slirp_send_packet
        cb.guest_error = lib.kvmkit_slirp_guest_error
        cb.clock_get_ns = lib.kvmkit_slirp_clock_get_ns
        cb.timer_new = lib.kvmkit_slirp_timer_new
        cb.timer_free = lib.kvmkit_slirp_timer_free
        cb.timer_mod = lib.kvmkit_slirp_timer_mod
        cb.register_poll_fd = lib.kvmkit_slirp_register_poll_fd
        cb.unregister_poll_fd = lib.kvmkit_slirp_unregister_poll_fd
        cb.notify = lib.kvmkit_slirp_notify
        cb.timer_new_opaque = lib.kvmkit_slirp_timer_new_opaque
        self._cfg, self._cb = cfg, cb                    # slirp keeps the callbacks' pointer
        with self.lock:
            self._slirp = lib.slirp_new(cfg, cb, self._handle)
        if self._slirp == ffi.NULL:
            os.close(self._wake_fd)
            raise SlirpError("slirp_new() refused the configuration")
        self.version = ffi.string(lib.slirp_version_string()).decode()

    # -- the guest side ------------------------------------------------------------------------
    def input(self, frame) -> None:
        """Hand slirp one Ethernet frame from the guest."""
        data = self.ffi.from_buffer("uint8_t[]", frame)
        with self.lock:
            if self._slirp is None:
                return
            self.lib.slirp_input(self._slirp, data, len(data))
        self.wake()                     # the frame may have opened a socket to watch

    # -- port forwards ------------------------------------------------------------------------
    def add_forward(self, fwd: Forward) -> None:
        """Listen on the host side of ``fwd``; SlirpError (with the reason the
        host gave, e.g. the port is in use) if that fails."""
        guest = fwd.guest_addr or DHCP_START
        if not _in_network(guest) or guest in (NETWORK, HOST, NAMESERVER, "10.0.2.255"):
            raise SlirpError(f"{fwd}: guest address {guest} is not a guest's address inside "
                             f"{NETWORK}/24")
        host_addr = self.ffi.new("struct in_addr *", {"s_addr": _inet(fwd.host_addr)})[0]
        guest_addr = self.ffi.new("struct in_addr *", {"s_addr": _inet(guest)})[0]
        with self.lock:
            self.ffi.errno = 0
            rc = self.lib.slirp_add_hostfwd(self._slirp, int(fwd.udp), host_addr, fwd.host_port,
                                            guest_addr, fwd.guest_port)
            err = self.ffi.errno
        if rc < 0:
            why = os.strerror(err) if err else "libslirp refused it"
            raise SlirpError(f"cannot listen on {fwd.host_addr}:{fwd.host_port} ({fwd.proto}): {why}")
        self.wake()

    def connection_info(self) -> str:
        with self.lock:
            raw = self.lib.slirp_connection_info(self._slirp)
        try:
            return self.ffi.string(raw).decode("utf-8", "replace")
        finally:
            self.lib.free(raw)

    # -- the event loop ------------------------------------------------------------------------
    def wake(self) -> None:
        """Make a waiting :meth:`poll_once` return and look again."""
        fd = self._wake_fd
        if fd is not None:
            os.eventfd_write(fd, 1)

    def poll_once(self, max_wait_ms: int = MAX_WAIT_MS, extra_fd: int | None = None) -> bool:
        """One round of the event loop; True if ``extra_fd`` became readable."""
        lib = self.lib
        self._poll_fds = []
        self._timeout[0] = 0xFFFFFFFF
        with self.lock:
            if self._slirp is None:
                return True
            lib.slirp_pollfds_fill(self._slirp, self._timeout, lib.kvmkit_slirp_add_poll,
                                   self._handle)
        wait = min(self._timeout[0], self._next_timer_ms(), max_wait_ms)
        poller = select.poll()
        for fd, events in self._poll_fds:
            poller.register(fd, events)
        poller.register(self._wake_fd, select.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, select.POLLIN)
        ready = dict(poller.poll(max(wait, 0)))
        if ready.get(self._wake_fd):
            try:
                os.eventfd_read(self._wake_fd)
            except BlockingIOError:
                pass
        self._revents = [ready.get(fd, 0) for fd, _ in self._poll_fds]
        with self.lock:
            if self._slirp is None:
                return True
            lib.slirp_pollfds_poll(self._slirp, 0, lib.kvmkit_slirp_get_revents, self._handle)
        self._run_timers()
        return extra_fd is not None and bool(ready.get(extra_fd))

    def run(self, stop_fd: int) -> None:
        """Run the event loop until ``stop_fd`` (an eventfd) is readable."""
        while not self.poll_once(MAX_WAIT_MS, stop_fd):
            pass

    def close(self) -> None:
        """Free the slirp instance (its sockets and forwards).  Stop
        :meth:`run` first."""
        with self.lock:
            if self._slirp is None:
                return
            self.lib.slirp_cleanup(self._slirp)
            self._slirp = None
            fd, self._wake_fd = self._wake_fd, None
        os.close(fd)

    # -- timers ---------------------------------------------------------------------------------
    @staticmethod
    def _now_ms() -> int:
        return time.monotonic_ns() // 1_000_000

    def _next_timer_ms(self) -> int:
        with self.lock:
            due = [t[1] for t in self._timers.values() if t[1] is not None]
        if not due:
            return MAX_WAIT_MS
        return max(min(due) - self._now_ms(), 0)

    def _run_timers(self) -> None:
        now = self._now_ms()
        with self.lock:
            if self._slirp is None:
                return
            for timer in list(self._timers.values()):
                if timer[1] is not None and timer[1] <= now:
                    timer[1] = None
                    timer[0]()

    def _new_timer(self, fire: Callable[[], None]):
        n = next(self._timer_ids)
        self._timers[n] = [fire, None]
        return self.ffi.cast("void *", n)

    def _timer_key(self, timer) -> int:
        return int(self.ffi.cast("uintptr_t", timer))

    # -- what the callbacks do (the lock is held: never call into slirp here) -------------
    def _on_send(self, buf, length: int) -> int:
        self._send(bytes(self.ffi.buffer(buf, length)))
        return length

    def _on_guest_error(self, msg) -> None:
        self._guest_errors += 1
        text = self.ffi.string(msg).decode("utf-8", "replace")
        level = logging.WARNING if self._guest_errors == 1 else logging.DEBUG
        self.log.log(level, "slirp: guest error: %s%s", text,
                     " (further guest errors are logged at debug level)" if level > logging.DEBUG
                     else "")

    def _on_add_poll(self, fd: int, events: int) -> int:
        mask = 0
        for slirp_bit, poll_bit in self._to_poll:
            if events & slirp_bit:
                mask |= poll_bit
        self._poll_fds.append((fd, mask))
        return len(self._poll_fds) - 1

    def _on_get_revents(self, index: int) -> int:
        if not 0 <= index < len(self._revents):
            return 0
        revents, out = self._revents[index], 0
        for poll_bit, slirp_bit in self._from_poll:
            if revents & poll_bit:
                out |= slirp_bit
        return out


def _in_network(addr: str) -> bool:
    return _inet(addr) & _inet(NETMASK) == _inet(NETWORK)


def _register_callbacks(ffi) -> None:
    """The extern "Python" functions: each finds its Slirp through ``opaque``
    and never lets an exception into C."""
    log = logging.getLogger(__name__)

    def onerror(exc_type, exc_value, tb):
        log.error("slirp callback failed: %s: %s", exc_type.__name__, exc_value,
                  exc_info=(exc_type, exc_value, tb))

    def owner(opaque) -> Slirp:
        return ffi.from_handle(opaque)

    @ffi.def_extern(onerror=onerror, error=-1)
    def kvmkit_slirp_send_packet(buf, length, opaque):
        return owner(opaque)._on_send(buf, length)

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_guest_error(msg, opaque):
        owner(opaque)._on_guest_error(msg)

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_clock_get_ns(opaque):
        return time.monotonic_ns()

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_timer_new(cb, cb_opaque, opaque):
        return owner(opaque)._new_timer(lambda: cb(cb_opaque))

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_timer_new_opaque(timer_id, cb_opaque, opaque):
        me = owner(opaque)
        return me._new_timer(lambda: me.lib.slirp_handle_timer(me._slirp, timer_id, cb_opaque))

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_timer_free(timer, opaque):
        me = owner(opaque)
        me._timers.pop(me._timer_key(timer), None)

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_timer_mod(timer, expire_ms, opaque):
        me = owner(opaque)
        entry = me._timers.get(me._timer_key(timer))
        if entry is not None:
            entry[1] = expire_ms
            me.wake()

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_register_poll_fd(fd, opaque):
        pass                    # every round of the loop asks slirp for its sockets anew

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_unregister_poll_fd(fd, opaque):
        pass

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_notify(opaque):
        owner(opaque).wake()

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_add_poll(fd, events, opaque):
        return owner(opaque)._on_add_poll(fd, events)

    @ffi.def_extern(onerror=onerror)
    def kvmkit_slirp_get_revents(index, opaque):
        return owner(opaque)._on_get_revents(index)
