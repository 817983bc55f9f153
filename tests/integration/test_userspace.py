"""Guest userspace checks every device from inside the guest.

One boot of the kit's ACPI kernel with 2 vCPUs and every device kind the
core ships with: the console (stdio), a second UART (socket), the CMOS RTC,
the i8042, a virtio-blk disk and user-mode virtio-net.  A hook script run by
the busybox /init uses the devices the way programs do and prints what it
sees as ``kvmkit-guest: KEY VALUE`` lines; the host types into both UARTs,
serves a file and takes one over the network, connects to a forwarded port,
and at the end stops the VM with ``kvmkit stop``: the ACPI power button, which
the guest's acpid turns into a ``poweroff`` through busybox init (ACPI S5:
kvmkit exits 0).  The disk image is checked after that.

Guest userspace runs on the nested CI host only with the kit's patched
kernel (guest/pvm-user-syscall.patch); every system call's kernel side is
emulated there, so the script keeps to a few dozen programs.
"""
import calendar
import hashlib
import os
import re
import secrets
import socket
import subprocess
import threading
import time

import pytest

from guest import KVMKIT, initrd_with_hooks, machine_file, run_kvmkit, seeded_bytes
from transfer import OUT_SIZE, Transfer

pytestmark = pytest.mark.kvm

MIB = 1 << 20
FILLER_MIB = 8
GUEST_FILE_KIB = 1024
NVRAM_MARK = "kvmkit-nv"
FORWARD_WAIT = 300              # s: the guest listens on the forwarded port, the host tries it

HOOK = r"""#!/bin/sh
say() { echo "kvmkit-guest: $*"; }

# SMP: a program pinned to each CPU reports the CPU it ran on (field 39).
for c in 0 1; do say "cpu-$c $(taskset -c $c cut -d' ' -f39 /proc/self/stat)"; done

# The CMOS RTC, read by hwclock between two reads of the guest's own clock
# (the console line may reach the host seconds later), and its NVRAM
# through the kernel's nvmem.
before=$(date +%s); clock=$(hwclock -r -u); after=$(date +%s)
say "hwclock $clock"
say "hwclock-between $before $after"
nv=/sys/bus/nvmem/devices/cmos_nvram0/nvmem
printf '@NVRAM_MARK@' | dd of=$nv bs=1 seek=20 conv=notrunc 2>/dev/null
say "nvram-size $(wc -c < $nv)"

# The console: the host types a line once it sees this.
say "console-ready"
read -r -t 120 line
say "console-read [$line]"

# The second UART: one open file, so the port is not reset between lines.
exec 3<>/dev/ttyS1
stty -echo -onlcr <&3
echo "hello-from-ttyS1" >&3
read -r -t 120 l1 <&3
say "ttyS1 [$l1]"
exec 3>&-

# virtio-blk: a file of random bytes written through ext4, read back after a
# remount; a host-made file hashed; a host-made filler deleted and trimmed.
mount -t ext4 /dev/vda /mnt && say "blk-mounted"
say "blk-hostfile $(sha256sum /mnt/host.bin | cut -d' ' -f1)"
kvmkit-rand @FILE_SEED@ @GUEST_BYTES@ > /mnt/guest.bin
sync
say "blk-written $(sha256sum /mnt/guest.bin | cut -d' ' -f1)"
umount /mnt && mount -t ext4 /dev/vda /mnt
say "blk-readback $(sha256sum /mnt/guest.bin | cut -d' ' -f1)"
rm /mnt/filler.bin && sync
say "blk-fstrim $(fstrim -v /mnt)"
umount /mnt && say "blk-unmounted"

# virtio-net over slirp (the kernel took a DHCP lease with ip=dhcp): DNS
# through 10.0.2.3, a file from the host, and a forwarded port's listener.
say "net-addr $(ip -4 -o addr show eth0 | awk '{print $4}')"
say "dns $(nslookup @DNS_NAME@ 10.0.2.3 2>&1 | awk '/^Address/ && !/10\.0\.2\.3/ {print $NF}' | sort | tr '\n' ' ')"
wget -q -O /tmp/in http://10.0.2.2:@HTTP_PORT@/blob
say "net-in $(sha256sum /tmp/in | cut -d' ' -f1)"
kvmkit-rand @OUT_SEED@ @OUT_BYTES@ > /tmp/out
say "net-out $(sha256sum /tmp/out | cut -d' ' -f1)"
nc -w 10 10.0.2.2 @SINK_PORT@ < /tmp/out
printf '#!/bin/sh\nread -r x\necho "guest-got:$x"\n' > /tmp/reply.sh && chmod +x /tmp/reply.sh
timeout @FORWARD_WAIT@ nc -l -p 8080 -e /tmp/reply.sh &
say "forward-listening"
wait

# The NVRAM still holds what was written at the start.
say "nvram $(dd if=$nv bs=1 skip=20 count=@NVRAM_LEN@ 2>/dev/null)"

# The end: the host's `kvmkit stop` presses the ACPI power button, busybox
# acpid runs /etc/acpi/PWRF/00000080 (a shell script: `poweroff`), busybox
# init stops everything and the kernel powers off through ACPI S5.
touch /tmp/kvmkit-no-reset
say "waiting for the power button"
while :; do sleep 5; done
"""


def make_disk(d):
    """A journal-less ext4 image with a host file and a filler the guest deletes."""
    src = d / "disk-src"
    src.mkdir()
    host_bin = os.urandom(256 * 1024)
    (src / "host.bin").write_bytes(host_bin)
    (src / "filler.bin").write_bytes(os.urandom(FILLER_MIB * MIB))
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "discard", "-d", str(src),
                    str(image)], check=True)
    return image, hashlib.sha256(host_bin).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_answer(name: str) -> set[str]:
    try:
        return {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except socket.gaierror:
        return set()


DNS_NAME = "deb.debian.org"


@pytest.fixture(scope="module")
def guest(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("userspace")
    image, host_sha = make_disk(d)
    blocks_before = os.stat(image).st_blocks
    xfer = Transfer(d, "127.0.0.1")            # a file from the host, a file to it
    fwd_port = free_port()
    seed = secrets.randbits(63)                 # the guest's file of random bytes
    hook = (HOOK.replace("@NVRAM_MARK@", NVRAM_MARK).replace("@NVRAM_LEN@", str(len(NVRAM_MARK)))
            .replace("@GUEST_BYTES@", str(GUEST_FILE_KIB * 1024)).replace("@FILE_SEED@", str(seed)).replace("@DNS_NAME@", DNS_NAME)
            .replace("@HTTP_PORT@", str(xfer.http_port))
            .replace("@OUT_SEED@", str(xfer.seed)).replace("@OUT_BYTES@", str(OUT_SIZE))
            .replace("@SINK_PORT@", str(xfer.sink_port)).replace("@FORWARD_WAIT@", str(FORWARD_WAIT)))
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", {"userspace": hook})
    ttys1 = d / "ttyS1.sock"
    m = machine_file(d / "userspace.toml", name="userspace", image=guest_kit["ACPI_VMLINUX"],
                     initrd=initrd, vcpus=2, memory="256M",
                     cmdline="console=ttyS0 panic=-1 reboot=k ip=dhcp",
                     extra_devices=[
                         {"kind": "serial8250", "port": 0x2f8, "backend": "socket", "path": str(ttys1)},
                         {"kind": "virtio-blk", "path": str(image)},
                         {"kind": "virtio-net", "forward": [f"tcp:127.0.0.1:{fwd_port}-:8080"]},
                     ])
    seen = {}

    def type_console(proc):
        proc.stdin.write(b"typed by the host\n")
        proc.stdin.flush()

    def talk_ttys1(proc):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        deadline = time.monotonic() + 120
        got = b""
        try:
            s.connect(str(ttys1))
            while b"hello-from-ttyS1" not in got and time.monotonic() < deadline:
                try:
                    chunk = s.recv(4096)
                except (socket.timeout, TimeoutError):
                    continue
                if not chunk:
                    break
                got += chunk
            seen["ttyS1"] = got
            s.sendall(b"typed-into-ttyS1\n")
            time.sleep(60)                   # hold the connection while the guest reads
        finally:
            s.close()

    def connect_forward(proc):
        deadline = time.monotonic() + FORWARD_WAIT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", fwd_port), timeout=30) as c:
                    c.sendall(b"through-the-forward\n")
                    reply = c.makefile("rb").readline()
                if reply:
                    seen["forward"] = reply
                    return
            except OSError:
                pass
            time.sleep(1)

    stopped = threading.Event()

    def press_the_power_button(proc):
        try:
            seen["stop"] = subprocess.run(KVMKIT + ["stop", "userspace", "--timeout", "300"],
                                          capture_output=True, text=True, timeout=400)
        finally:
            stopped.set()

    # Deadlines for a hung guest, not speed checks: unloaded this run takes
    # about 270 s; with a busy loop on each core of the nested host it took
    # over 1200 s, the power button's shutdown alone more than a minute.
    try:
        result = run_kvmkit(["-v", "run", str(m)], timeout=2400, stdin=subprocess.PIPE,
                            triggers=[(r"kvmkit-guest: userspace up", talk_ttys1),
                                      (r"kvmkit-guest: console-ready", type_console),
                                      (r"kvmkit-guest: forward-listening", connect_forward),
                                      (r"kvmkit-guest: waiting for the power button",
                                       press_the_power_button)])
        stopped.wait(60)
    finally:
        xfer.close()
    print(result.describe())
    facts = {}
    for _, line in result.lines:
        mt = re.search(r"kvmkit-guest: (\S+) ?(.*)$", line)
        if mt:
            facts.setdefault(mt.group(1), mt.group(2).strip())
    return {"result": result, "facts": facts, "seed": seed, "xfer": xfer, "seen": seen, "image": image, "host_sha": host_sha,
            "blocks_before": blocks_before, "blob_sha": hashlib.sha256(xfer.blob).hexdigest()}


def fact(guest, key):
    value = guest["facts"].get(key)
    assert value is not None, f"the guest did not report {key!r}\n" + guest["result"].describe()
    return value


def test_power_button_powers_the_guest_off_through_its_userspace(guest):
    """``kvmkit stop`` presses the ACPI power button (the GED's interrupt); the
    guest's _EVT notifies PWRB, the kernel's button driver reports a key,
    busybox acpid runs ``poweroff``, busybox init stops everything, and the
    guest's S5 ends kvmkit with status 0."""
    r, stop = guest["result"], guest["seen"].get("stop")
    assert stop is not None, "kvmkit stop did not run or return\n" + r.describe()
    assert "pressing the ACPI power button" in r.stderr, r.describe() + stop.stdout + stop.stderr
    assert "the guest took the power-button event" in r.stderr, r.describe()
    assert "The system is going down NOW!" in r.console or "Sent SIGTERM to all processes" in r.console, \
        r.describe()
    assert stop.returncode == 0 and "(exit status 0)" in stop.stdout, stop.stdout + stop.stderr
    assert r.returncode == 0 and "guest power-off" in r.stderr, r.describe()


def test_each_cpu_runs_a_pinned_program(guest):
    assert fact(guest, "cpu-0") == "0"
    assert fact(guest, "cpu-1") == "1"


def test_hwclock_reads_host_time(guest):
    """The RTC reads the host's time and keeps it: hwclock's reading lies
    between the guest clock's readings just before and after it (a clock
    that stood still since boot, or ran at another rate, is minutes off by
    then), and between kvmkit's start and the host reading the line.  The
    line's arrival time alone is no bound: under load the console took 6.6 s
    to bring it."""
    r = guest["result"]
    at = r.find(r"kvmkit-guest: hwclock ")[0]
    # busybox: "Thu Dec  3 08:47:50 2026  0.000000 seconds", in UTC with -u
    shown = " ".join(fact(guest, "hwclock").split()[:5])
    clock = calendar.timegm(time.strptime(shown, "%a %b %d %H:%M:%S %Y"))
    before, after = (int(v) for v in fact(guest, "hwclock-between").split())
    # whole seconds each: the RTC and the guest's clock may tick apart by up to 1 s
    assert before - 1 <= clock <= after + 1, (shown, before, after)
    assert int(r.started) <= clock <= at + 1, (shown, time.ctime(r.started), time.ctime(at))


def test_rtc_nvram_keeps_what_the_guest_wrote(guest):
    assert int(fact(guest, "nvram-size")) >= 100       # 114 bytes behind the clock registers
    assert fact(guest, "nvram") == NVRAM_MARK


def test_console_input_reaches_a_guest_read(guest):
    assert fact(guest, "console-read") == "[typed by the host]"


def test_second_uart_both_ways(guest):
    assert b"hello-from-ttyS1" in guest["seen"].get("ttyS1", b""), guest["seen"]
    assert fact(guest, "ttyS1") == "[typed-into-ttyS1]"


def test_guest_reads_a_host_made_file_from_virtio_blk(guest):
    assert "blk-mounted" in guest["facts"], guest["result"].describe()
    assert fact(guest, "blk-hostfile") == guest["host_sha"]


def test_guest_written_file_reads_back_and_is_in_the_image(guest):
    written = fact(guest, "blk-written")
    assert written == hashlib.sha256(seeded_bytes(guest["seed"], GUEST_FILE_KIB * 1024)).hexdigest()
    assert fact(guest, "blk-readback") == written
    assert "blk-unmounted" in guest["facts"]
    out = subprocess.run(["debugfs", "-R", "cat /guest.bin", str(guest["image"])],
                         capture_output=True, check=True).stdout
    assert len(out) == GUEST_FILE_KIB * 1024
    assert hashlib.sha256(out).hexdigest() == written


def test_image_is_clean_after_the_guest_unmounted_it(guest):
    check = subprocess.run(["e2fsck", "-fn", str(guest["image"])], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_fstrim_punches_holes_the_host_sees(guest):
    trimmed = fact(guest, "blk-fstrim")
    assert re.search(r"/mnt: \d+ (bytes|[KMG]i?B)", trimmed) or "trimmed" in trimmed, trimmed
    after = os.stat(guest["image"]).st_blocks
    freed_mib = (guest["blocks_before"] - after) * 512 / MIB
    # The filler was FILLER_MIB; the guest's own file took 1 MiB back.
    assert freed_mib >= FILLER_MIB - 2, (guest["blocks_before"], after)


def test_guest_got_its_dhcp_address(guest):
    assert fact(guest, "net-addr") == "10.0.2.15/24"


def test_dns_through_slirp_matches_the_host(guest):
    want = host_answer(DNS_NAME)
    if not want:
        pytest.skip(f"this host cannot resolve {DNS_NAME} itself")
    assert set(fact(guest, "dns").split()) & want, (fact(guest, "dns"), want)


def test_file_from_the_host_over_http(guest):
    assert fact(guest, "net-in") == guest["blob_sha"]


def test_file_to_the_host_over_tcp(guest):
    sent = fact(guest, "net-out")
    xfer = guest["xfer"]
    want = seeded_bytes(xfer.seed, OUT_SIZE)
    assert sent == hashlib.sha256(want).hexdigest()
    assert bytes(xfer.received) == want, len(xfer.received)


def test_tcp_forward_reaches_a_guest_listener(guest):
    assert guest["seen"].get("forward", b"").strip() == b"guest-got:through-the-forward", guest["seen"]
