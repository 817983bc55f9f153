"""A real VM driven through its control socket.

One foreground VM whose userspace prints a counter every second is paused
(exit counts and the counter stay still), resumed (the counter goes on), and
stopped gracefully: Ctrl-Alt-Del through the i8042 model reaches busybox
init, which reboots the guest (status 0).  A detached VM
is listed, attached to, refused a second VM of the same name, and killed
(status 3).  A kernel panic reported through pvpanic ends kvmkit with 4.
Every VM uses a private runtime directory (XDG_RUNTIME_DIR).
"""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from guest import initrd_with_hooks

pytestmark = pytest.mark.kvm

KVMKIT = [sys.executable, "-m", "kvmkit"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("xdg")
    os.chmod(d, 0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(d)}


def kvmkit(env, *args, timeout=120):
    return subprocess.run(KVMKIT + list(args), capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def status(env, name):
    r = kvmkit(env, "status", name, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Console:
    """Collects a foreground VM's stdout with arrival times."""

    def __init__(self, proc):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for raw in proc.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))

    def wait_for(self, pattern, timeout=600):
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(rx.search(line) for _, line in self.lines):
                return True
            time.sleep(0.2)
        return False


COUNTER = "#!/bin/sh\ni=0\nwhile :; do i=$((i+1)); echo \"kvmkit-guest: count $i\"; sleep 1; done\n"


def counts(console) -> list[int]:
    return [int(m.group(1)) for _, line in console.lines
            if (m := re.search(r"kvmkit-guest: count (\d+)", line))]


@pytest.fixture(scope="module")
def session(guest_kit, env, tmp_path_factory):
    """Pause a guest printing a counter, resume it, then stop it gracefully."""
    initrd = initrd_with_hooks(guest_kit, tmp_path_factory.mktemp("ctl") / "initrd.cpio", {"count": COUNTER})
    proc = subprocess.Popen(KVMKIT + ["run", "--name", "ctl", "--kernel", str(guest_kit["SMALL_VMLINUX"]),
                                      "--initrd", str(initrd), "--vcpus", "1",
                                      "--append", "console=ttyS0 panic=-1 reboot=k"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    console = Console(proc)
    facts = {}
    t0 = time.monotonic()
    phases = facts["phases"] = []               # (what, seconds since the start): where time goes

    def phase(what):
        phases.append((what, round(time.monotonic() - t0, 1)))
    try:
        assert console.wait_for(r"kvmkit-guest: count 3\b", 600), console.lines[-20:]
        phase("count 3")
        facts["listed"] = kvmkit(env, "list").stdout
        paused = kvmkit(env, "pause", "ctl")
        phase("paused")
        facts["pause_rc"] = paused.returncode
        before = status(env, "ctl")
        counted = counts(console)
        time.sleep(4)
        after = status(env, "ctl")
        facts["paused"] = (before, after, counts(console)[len(counted):])
        facts["resume_rc"] = kvmkit(env, "resume", "ctl").returncode
        last = max(counts(console))
        facts["resumed_count"] = console.wait_for(rf"kvmkit-guest: count {last + 2}\b", 120)
        phase("counted on")
        facts["resumed"] = status(env, "ctl")
        # busybox init's shutdown took over 120 s with a busy loop on each core
        stop = kvmkit(env, "stop", "ctl", "--timeout", "300", timeout=400)
        phase("stopped")
        facts["stop"] = stop
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console.thread.join(timeout=5)
    facts["returncode"] = proc.returncode
    facts["stderr"] = proc.stderr.read().decode(errors="replace")
    facts["console"] = "\n".join(line for _, line in console.lines)
    print("ctl session:", phases)
    return facts


def test_running_vm_is_listed(session):
    assert re.search(r"^ctl: running, 1 vCPU\(s\), 256 MiB", session["listed"], re.M), session["listed"]


def test_pause_stops_vcpus_and_the_guest_counter(session):
    before, after, new_counts = session["paused"]
    assert session["pause_rc"] == 0
    assert before["state"] == after["state"] == "paused"
    assert before["exits_total"] == after["exits_total"]
    assert new_counts == [], new_counts


def test_resume_continues_the_guest_counter(session):
    _, after, _ = session["paused"]
    assert session["resume_rc"] == 0
    assert session["resumed_count"], session["console"][-2000:]
    assert session["resumed"]["state"] == "running"
    assert session["resumed"]["exits_total"] > after["exits_total"]


def test_graceful_stop_reaches_busybox_init_and_ends_with_status_0(session):
    stop = session["stop"]
    assert stop.returncode == 0, stop.stderr
    assert "guest reset" in stop.stdout and "(exit status 0)" in stop.stdout, stop.stdout
    # Ctrl-Alt-Del went to init (not the kernel's immediate restart): it stopped userspace first.
    assert re.search(r"The system is going down NOW!|Sent SIGTERM to all processes", session["console"]), \
        session["console"][-2000:]
    assert "reboot: Restarting system" in session["console"]
    assert session["returncode"] == 0, session["stderr"]


def test_socket_is_gone_after_the_vm(session, env):
    assert kvmkit(env, "list").stdout.strip() == "no VMs are running"


def test_detached_vm_console_name_clash_and_kill(guest_kit, env):
    args = ["--kernel", str(guest_kit["SMALL_VMLINUX"]), "--initrd", str(guest_kit["SPIN_CPIO"]),
            "--append", "console=ttyS0 panic=-1"]
    r = kvmkit(env, "run", "--detach", "--name", "bg", *args)
    assert r.returncode == 0 and "kvmkit console bg" in r.stdout, r.stderr
    try:
        clash = kvmkit(env, "run", "--name", "bg", *args)
        assert clash.returncode == 2 and "already running" in clash.stderr, clash.stderr
        assert "bg: running" in kvmkit(env, "list").stdout
        path = os.path.join(env["XDG_RUNTIME_DIR"], "kvmkit", "bg.console")
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        seen, deadline = b"", time.monotonic() + 600        # boots crawl on a loaded nested host
        while b"Linux version" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no 'Linux version' on the console in 600 s: {seen[-500:]!r}"
            s.settimeout(left)
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                chunk = None
            assert chunk is not None, f"no 'Linux version' on the console in 600 s: {seen[-500:]!r}"
            assert chunk, f"the console closed before 'Linux version': {seen[-500:]!r}"
            seen += chunk
        s.close()
    finally:
        kill = kvmkit(env, "kill", "bg", timeout=60)
    assert kill.returncode == 0 and "(exit status 3)" in kill.stdout, kill.stdout + kill.stderr


def test_stale_socket_is_cleaned_up(env):
    d = os.path.join(env["XDG_RUNTIME_DIR"], "kvmkit")
    os.makedirs(d, mode=0o700, exist_ok=True)
    stale = os.path.join(d, "ghost.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()                                  # a socket file nobody listens on
    assert kvmkit(env, "list").stdout.strip() == "no VMs are running"
    assert not os.path.exists(stale)
    r = kvmkit(env, "status", "ghost")
    assert r.returncode == 2 and "no VM named 'ghost'" in r.stderr


def test_guest_panic_is_reported_through_pvpanic(guest_kit, env):
    # No initramfs and no root=: the kernel panics on any host once its init calls are done.
    r = kvmkit(env, "run", "--kernel", str(guest_kit["SMALL_VMLINUX"]), "--append",
               "console=ttyS0 panic=-1 reboot=k", "--device", "pvpanic", timeout=900)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "Kernel panic" in r.stdout
    assert "guest kernel panicked (pvpanic)" in r.stderr
