"""The bad-input table: machine files, flags and control requests a careless
user writes.  Each must give a clean one-line error: for the command, exit
status 2, exactly one ``kvmkit: error:`` line on stderr naming the file, key
or device, and no traceback; for the control socket, one JSON error answer
with the connection still serving.  `kvmkit check` must refuse every machine
file here (it said "ok" to 14 of them before it ran the plugins' checks).

Commands run in-process through ``kvmkit.cli.main`` (an exception escaping it
is what a traceback would be); a few also run as real processes at the end.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmkit import cli
from kvmkit.control import ControlServer

sys.path.insert(0, str(Path(__file__).parents[1] / "contract"))
from fake_kernels import elf_kernel  # noqa: E402

KERNEL = '[kernel]\nimage = "vmlinux"\n'
SERIAL = '[[device]]\nkind = "serial8250"\n'


def dev(kind: str, **keys) -> str:
    lines = [f'kind = "{kind}"'] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n[[device]]\n" + "\n".join(lines) + "\n"


def machine(body: str, kernel: str = KERNEL) -> str:
    return kernel + body


LONG = "x" * 70
# (id, machine file text, needles the error line must hold besides the file name)
MACHINE_FILES = [
    ("toml", '[kernel\nimage = "vmlinux"\n', ["not valid TOML"]),
    ("no-kernel-table", '[machine]\nvcpus = 1\n', ["[kernel] image is missing"]),
    ("kernel-missing", '[kernel]\nimage = "nope/vmlinux"\n', ["[kernel] image", "not found"]),
    ("kernel-not-a-kernel", '[kernel]\nimage = "notes.txt"\n', ["[kernel] image", "neither"]),
    ("kernel-dir", '[kernel]\nimage = "adir"\n', ["[kernel] image", "not a file"]),
    ("initrd-dir", KERNEL + 'initrd = "adir"\n', ["[kernel] initrd", "not a file"]),
    ("initrd-empty", KERNEL + 'initrd = "empty"\n', ["[kernel] initrd", "empty"]),
    ("cmdline-type", KERNEL + "cmdline = 3\n", ["[kernel] cmdline", "string"]),
    ("cmdline-nul", KERNEL + 'cmdline = "a\\u0000b"\n', ["[kernel] cmdline", "NUL"]),
    ("kernel-key", KERNEL + 'kernal = "x"\n', ["[kernel]", "unknown key 'kernal'"]),
    ("top-key", KERNEL + "[network]\n", ["unknown key 'network'"]),
    ("machine-not-table", 'machine = 3\n' + KERNEL, ["[machine] must be a table"]),
    ("memory-word", '[machine]\nmemory = "lots"\n' + KERNEL, ["[machine] memory", "'lots'"]),
    ("memory-small", '[machine]\nmemory = 1\n' + KERNEL, ["[machine] memory", "at least 16M"]),
    ("memory-100T", '[machine]\nmemory = "100T"\n' + KERNEL, ["[machine] memory", "100T", "host"]),
    ("memory-unaligned", '[machine]\nmemory = 16777217\n' + KERNEL, ["[machine] memory", "4K"]),
    ("memory-negative", '[machine]\nmemory = -5\n' + KERNEL, ["[machine] memory", "negative"]),
    ("vcpus-zero", '[machine]\nvcpus = 0\n' + KERNEL, ["[machine] vcpus", "got 0"]),
    ("vcpus-word", '[machine]\nvcpus = "two"\n' + KERNEL, ["[machine] vcpus", "'two'"]),
    ("vcpus-many", '[machine]\nvcpus = 1000\n' + KERNEL, ["[machine] vcpus", "1000"]),
    ("quirks", '[machine]\nhost_quirks = "maybe"\n' + KERNEL, ["[machine] host_quirks"]),
    ("acpi", '[machine]\nacpi = "no"\n' + KERNEL, ["[machine] acpi", "true or false"]),
    ("machine-key", '[machine]\ncpus = 2\n' + KERNEL, ["[machine]", "unknown key 'cpus'"]),
    ("name-nul", '[machine]\nname = "a\\u0000b"\n' + KERNEL, ["[machine] name"]),
    ("name-long", f'[machine]\nname = "{LONG}"\n' + KERNEL, ["[machine] name", "1-64"]),
    ("name-slash", '[machine]\nname = "a/b"\n' + KERNEL, ["[machine] name", "'a/b'"]),
    ("name-empty", '[machine]\nname = ""\n' + KERNEL, ["[machine] name"]),
    ("name-space", '[machine]\nname = "my vm"\n' + KERNEL, ["[machine] name", "'my vm'"]),
    ("name-dot", '[machine]\nname = ".."\n' + KERNEL, ["[machine] name", "'..'"]),
    ("name-type", '[machine]\nname = 7\n' + KERNEL, ["[machine] name", "string"]),
    ("devices-not-tables", "device = 3\n" + KERNEL, ["[[device]] tables"]),
    ("device-not-table", "device = [1]\n" + KERNEL, ["device[0]", "expected a table"]),
    ("device-no-kind", KERNEL + "[[device]]\nport = 1\n", ["device[0]", "missing 'kind'"]),
    ("kind-unknown", machine(dev("floppy")), ["device[0] (floppy)", "unknown device kind", "installed kinds"]),
    ("key-unknown", machine(dev("rtc", prot=0x70)), ["device[0] (rtc)", "unknown key 'prot'"]),
    ("key-type", machine(dev("rtc", port="seventy")), ["device[0] (rtc)", "port", "integer"]),
    ("serial-file-no-path", machine(dev("serial8250", backend="file")), ["device[0] (serial8250)", "path"]),
    ("serial-stdio-path", machine(dev("serial8250", path="x.log")), ["device[0] (serial8250)", "path is only"]),
    ("serial-same-port", machine(dev("serial8250", backend="file", path="a.log")
                                 + dev("serial8250", backend="file", path="b.log")),
     ["device[1] (serial8250)", "overlap", "device[0]"]),
    ("serial-two-stdio", machine(dev("serial8250") + dev("serial8250", port=0x2F8)),
     ["device[1] (serial8250)", "stdio", "device[0]"]),
    ("serial-odd-port", machine(dev("serial8250", port=0x300)), ["device[0] (serial8250)", "irq"]),
    ("serial-irq", machine(dev("serial8250", irq=99)), ["device[0] (serial8250)", "irq", "maximum 23"]),
    ("serial-backend", machine(dev("serial8250", backend="tcp")), ["device[0] (serial8250)", "backend", "'tcp'"]),
    ("serial-socket-long", machine(dev("serial8250", backend="socket", path="s" * 120)),
     ["device[0] (serial8250)", "path", "UNIX socket"]),
    ("serial-file-no-dir", machine(dev("serial8250", backend="file", path="no/such/dir/c.log")),
     ["device[0] (serial8250)", "does not exist"]),
    ("serial-file-path-type", machine(dev("serial8250", backend="file", path=5)),
     ["device[0] (serial8250)", "path", "path string"]),
    ("blk-no-path", machine(dev("virtio-blk")), ["device[0] (virtio-blk)", "missing required key 'path'"]),
    ("blk-missing-image", machine(dev("virtio-blk", path="nope.img")), ["device[0] (virtio-blk)", "nope.img", "does not exist"]),
    ("blk-image-dir", machine(dev("virtio-blk", path="adir")), ["device[0] (virtio-blk)", "directory"]),
    ("blk-image-odd-size", machine(dev("virtio-blk", path="odd.img")), ["device[0] (virtio-blk)", "multiple of"]),
    ("blk-two-on-one-image", machine(dev("virtio-blk", path="disk.img") + dev("virtio-blk", path="./disk.img")),
     ["device[1] (virtio-blk)", "disk.img", "device[0]"]),
    ("blk-serial-long", machine(dev("virtio-blk", path="disk.img", serial="s" * 21)),
     ["device[0] (virtio-blk)", "serial", "at most 20"]),
    ("blk-serial-unicode", machine(dev("virtio-blk", path="disk.img", serial="dïsk")),
     ["device[0] (virtio-blk)", "serial", "ASCII"]),
    ("blk-cache", machine(dev("virtio-blk", path="disk.img", cache="sometimes")), ["device[0] (virtio-blk)", "cache"]),
    ("blk-queue", machine(dev("virtio-blk", path="disk.img", queue="turbo")), ["device[0] (virtio-blk)", "queue"]),
    ("net-tap-no-ifname", machine(dev("virtio-net", backend="tap")), ["device[0] (virtio-net)", "ifname"]),
    ("net-tap-bad-ifname", machine(dev("virtio-net", backend="tap", ifname="a-very-long-tap-name")),
     ["device[0] (virtio-net)", "ifname"]),
    ("net-mac-word", machine(dev("virtio-net", mac="my-mac")), ["device[0] (virtio-net)", "mac", "'my-mac'"]),
    ("net-mac-multicast", machine(dev("virtio-net", mac="01:00:5e:00:00:01")), ["device[0] (virtio-net)", "multicast"]),
    ("net-mac-twice", machine(dev("virtio-net", mac="52:54:00:00:00:01") + dev("virtio-net", mac="52:54:00:00:00:01")),
     ["device[1] (virtio-net)", "mac", "device[0]"]),
    ("net-forward-syntax", machine(dev("virtio-net", forward=["ssh"])), ["device[0] (virtio-net)", "forward[0]"]),
    ("net-forward-port", machine(dev("virtio-net", forward=["tcp::99999-:22"])), ["device[0] (virtio-net)", "99999"]),
    ("net-forward-on-tap", machine(dev("virtio-net", backend="tap", ifname="tap0", forward=["tcp::2222-:22"])),
     ["device[0] (virtio-net)", "forward is only"]),
    ("net-ifname-on-user", machine(dev("virtio-net", ifname="tap0")), ["device[0] (virtio-net)", "ifname is only"]),
    ("net-mtu", machine(dev("virtio-net", mtu=10)), ["device[0] (virtio-net)", "mtu", "minimum"]),
    ("rtc-fixed-start", machine(dev("rtc-fixed", start="yesterday")), ["device[0] (rtc-fixed)", "start", "'yesterday'"]),
    ("rtc-fixed-zone", machine(dev("rtc-fixed", start="2000-01-01T00:00:00")), ["device[0] (rtc-fixed)", "time zone"]),
    ("rtc-fixed-year", machine(dev("rtc-fixed", start="1900-01-01T00:00:00Z")), ["device[0] (rtc-fixed)", "1970"]),
    ("two-clocks", machine(dev("rtc") + dev("rtc-fixed")), ["device[1] (rtc-fixed)", "overlap", "device[0] (rtc)"]),
]


def _rtc_bounds_offset() -> bool:
    from kvmkit_rtc.plugin import SPEC
    key = SPEC.key("utc_offset")
    return key is not None and key.max is not None


if _rtc_bounds_offset():          # the schema bound comes with issue 13 item 8
    MACHINE_FILES.append(("rtc-utc-offset", machine(dev("rtc", utc_offset=10**15)),
                          ["device[0] (rtc)", "utc_offset"]))

# (id, argv with {m} for a good machine file, needles)
FLAGS = [
    ("vcpus-word", ["run", "{m}", "--vcpus", "abc"], ["--vcpus", "'abc'"]),
    ("check-vcpus-word", ["check", "{m}", "--vcpus", "abc"], ["--vcpus", "'abc'"]),
    ("vcpus-zero", ["check", "{m}", "--vcpus", "0"], ["vcpus", "got 0"]),
    ("memory-word", ["check", "{m}", "--memory", "lots"], ["memory", "'lots'"]),
    ("name-flag", ["check", "{m}", "--name", "my vm"], ["name", "'my vm'"]),
    ("quirks-flag", ["run", "{m}", "--host-quirks", "maybe"], ["--host-quirks", "'maybe'"]),
    ("device-empty", ["check", "{m}", "--device", ""], ["--device", "kind"]),
    ("device-no-kind", ["check", "{m}", "--device", "port=1"], ["--device", "kind"]),
    ("device-no-value", ["check", "{m}", "--device", "serial8250,port"], ["--device", "key=value"]),
    ("device-bad-key", ["check", "{m}", "--device", "serial8250,port=0x3f8,speed=9600"],
     ["device[1] (serial8250)", "unknown key 'speed'"]),
    ("no-machine-no-kernel", ["run"], ["--kernel"]),
    ("machine-file-missing", ["check", "nope.toml"], ["nope.toml", "not found"]),
    ("stop-timeout-nan", ["stop", "vm", "--timeout", "nan"], ["--timeout", "'nan'"]),
    ("stop-timeout-inf", ["stop", "vm", "--timeout", "inf"], ["--timeout", "'inf'"]),
    ("stop-timeout-negative", ["stop", "vm", "--timeout", "-1"], ["--timeout", "'-1'"]),
    ("stop-timeout-word", ["stop", "vm", "--timeout", "soon"], ["--timeout", "'soon'"]),
    ("unknown-command", ["boot", "{m}"], ["'boot'"]),
    ("stop-nobody", ["stop", "nobody-runs-this"], ["nobody-runs-this", "no VM"]),
]

CONTROL = [b"not json", b"\xff\xfe", b"[]", b"{}", b'{"cmd": 1}', b'{"cmd": "reboot"}',
           b'{"cmd": "stop", "timeout": null}', b'{"cmd": "stop", "timeout": [1]}',
           b'{"cmd": "stop", "timeout": NaN}', b'{"cmd": "stop", "timeout": Infinity}',
           b'{"cmd": "stop", "timeout": -1}', b'{"cmd": "stop", "timeout": 1e400}',
           b'{"cmd": "pause", "timeout": 3}']


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    elf_kernel(tmp_path / "vmlinux")
    (tmp_path / "notes.txt").write_text("not a kernel\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    (tmp_path / "good.toml").write_text(KERNEL + dev("serial8250", backend="file", path="c.log"))
    return tmp_path


def main(argv, capsys) -> tuple[int, list[str]]:
    """Run ``kvmkit argv`` in-process: its exit status and its stderr lines."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:                  # argparse
        code = e.code
    except Exception as e:                   # what a process would print as a traceback
        capsys.readouterr()
        return 1, [f"Traceback (escaped main): {type(e).__name__}: {e}"]
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def clean(code, lines, needles) -> str | None:
    """Why this is not a clean one-line error, or None."""
    if code != 2:
        return f"exit status {code}"
    if len(lines) != 1:
        return f"{len(lines)} stderr lines: {lines}"
    if not lines[0].startswith("kvmkit: error: ") or "Traceback" in lines[0]:
        return f"not a kvmkit error line: {lines[0]}"
    missing = [n for n in needles if n not in lines[0]]
    return f"misses {missing}: {lines[0]}" if missing else None


class FakeMachine:
    def __init__(self):
        self.stopping = threading.Event()

    def status(self):
        return {"state": "running"}

    def pause(self): ...
    def resume(self): ...

    def request_stop(self, reason, code):
        self.stopping.set()

    def request_guest_shutdown(self):
        return True


def control_answers(path, raw: bytes):
    """The answers to ``raw`` and to a status request after it on one connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(raw + b"\n" + b'{"cmd": "status"}\n')
        buf, deadline = b"", time.monotonic() + 5
        while buf.count(b"\n") < 2 and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_bad_input_table(workdir, capsys):
    failures, failed, total = [], set(), 0
    for name, text, needles in MACHINE_FILES:
        path = workdir / f"{name}.toml"
        path.write_text(text)
        for command in ("check", "run"):       # run refuses before it opens /dev/kvm
            code, lines = main([command, str(path)], capsys)
            why = clean(code, lines, [str(path), *needles])
            if why:
                failures.append(f"{command} {name}: {why}")
                failed.add(("file", name))
        total += 1
    for name, argv, needles in FLAGS:
        code, lines = main([a.format(m=workdir / "good.toml") for a in argv], capsys)
        why = clean(code, lines, needles)
        if why:
            failures.append(f"flags {name}: {why}")
            failed.add(("flag", name))
        total += 1
    server = ControlServer(FakeMachine(), "table")
    try:
        for raw in CONTROL:
            answers = control_answers(server.path, raw)
            ok = (len(answers) == 2 and answers[0]["ok"] is False and "\n" not in answers[0]["error"]
                  and answers[1] == {"ok": True, "result": {"state": "running"}})
            if not ok:
                failures.append(f"control {raw!r}: {answers}")
                failed.add(("control", raw))
            total += 1
        assert not server.machine.stopping.is_set()
    finally:
        server.stopped("over", 0)
        server.close()
    clean_count = total - len(failed)
    print(f"\nbad-input table: {clean_count} of {total} inputs gave a clean one-line error "
          f"({len(MACHINE_FILES)} machine files through check and run, {len(FLAGS)} flags, "
          f"{len(CONTROL)} control requests)")
    assert total >= 50
    assert not failures, "\n".join(failures)


def test_check_reports_every_problem_of_a_file(workdir, capsys):
    path = workdir / "many.toml"
    path.write_text('[machine]\nvcpus = 0\nname = "my vm"\n' + KERNEL
                    + dev("serial8250", backend="file") + dev("virtio-blk", path="nope.img")
                    + dev("rtc-fixed", start="yesterday") + dev("floppy"))
    code, lines = main(["check", str(path)], capsys)
    assert code == 2
    assert all(line.startswith(f"kvmkit: error: {path}: ") for line in lines), lines
    assert len(lines) == 6, lines
    for needle in ("vcpus", "[machine] name", "device[0] (serial8250)", "device[1] (virtio-blk)",
                   "device[2] (rtc-fixed)", "device[3] (floppy)"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)


def test_a_good_file_is_ok(workdir, capsys):
    capsys.readouterr()
    assert cli.main(["check", str(workdir / "good.toml")]) == 0
    assert capsys.readouterr().out.startswith("ok: good:")


@pytest.mark.parametrize("argv", [["check", "{m}", "--vcpus", "abc"], ["stop", "vm", "--timeout", "nan"],
                                  ["check", "{d}/blk.toml"]])
def test_as_a_real_process(workdir, argv):
    (workdir / "blk.toml").write_text(KERNEL + dev("virtio-blk", path="nope.img"))
    args = [a.format(m=workdir / "good.toml", d=workdir) for a in argv]
    r = subprocess.run([sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert clean(r.returncode, lines, []) is None, r.stderr
