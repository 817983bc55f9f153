"""kvmkit sandbox's host side without a VM: finding the kernel, the job the
init reads, the status it reports, the machine it gets, building the init."""
import logging
import os
import struct
import subprocess
from pathlib import Path

import pytest

from kvmkit.cli import build_parser, main
from kvmkit.cli_sandbox import _outcome
from kvmkit.config import ConfigError
from kvmkit.plugin_api import EXIT_GUEST_PANIC
from kvmkit.sandbox import guest_init, job, kernels, plan


def test_kernel_search_order(tmp_path):
    tried = kernels.candidates(tmp_path, "6.1.0-x")
    assert tried == [tmp_path / "bzImage", tmp_path / "arch/x86/boot/bzImage",
                     Path("/boot/vmlinuz-6.1.0-x")]
    (tmp_path / "arch/x86/boot").mkdir(parents=True)
    (tmp_path / "arch/x86/boot/bzImage").write_bytes(b"k")
    assert kernels.find_kernel(tmp_path, "none") == tmp_path / "arch/x86/boot/bzImage"
    (tmp_path / "bzImage").write_bytes(b"k")
    assert kernels.find_kernel(tmp_path, "none") == tmp_path / "bzImage"


def test_no_kernel_found_names_the_places(tmp_path):
    with pytest.raises(kernels.KernelNotFound, match="bzImage.*--kernel"):
        kernels.find_kernel(tmp_path, "no-such-release")


def test_job_records():
    j = job.Job(argv=["sh", "-c", "echo é"], cwd="/src", env={"A": "1"}, uid=1000, gid=100,
                groups=[100, 27], rwdirs=[("kvmkit-rw0", "/src/out")], overlays=["/etc"])
    records = j.encode().split(b"\0")
    assert records[-1] == b""
    assert records[:-1] == [b"uid=1000", b"gid=100", b"groups=100,27", b"cwd=/src",
                            b"hostname=kvmkit", b"overlay=/etc", b"rwdir=kvmkit-rw0:/src/out",
                            b"env=A=1", b"arg=sh", b"arg=-c", "arg=echo é".encode()]
    assert b"tty=1" in job.Job(argv=[], cwd="/", env={}, tty=True).encode()
    with pytest.raises(ValueError, match="NUL"):
        job.Job(argv=["a\0b"], cwd="/", env={}).encode()


@pytest.mark.parametrize("text, code", [
    ("exit 0\n", 0), ("exit 7\n", 7), ("exit 255", 255), ("signal 9\n", 137),
    ("error mount x: ENOENT\n", job.EXIT_SANDBOX_ERROR), ("garbage", job.EXIT_SANDBOX_ERROR),
])
def test_status_lines(text, code):
    assert job.parse_status(text).code == code


def test_no_status():
    assert job.parse_status("") is None


def make(tmp_path, **kw):
    opts = plan.Options(kernel=tmp_path / "bzImage", argv=kw.pop("argv", ["true"]), cwd=tmp_path,
                        env={"PATH": "/bin"}, **kw)
    return plan.make_plan(opts, Path("/opt/init"))


def test_plan_for_a_command(tmp_path):
    (tmp_path / "out").mkdir()
    p = make(tmp_path, rwdirs=["out"], overlay_rwdirs=["."], memory="512M", vcpus=2)
    try:
        c = p.config
        assert (c.memory, c.vcpus) == (512 << 20, 2)
        assert c.kernel.cmdline.split() == ["console=hvc0", "quiet", "reboot=k", "panic=-1",
                                            "rootfstype=virtiofs", "root=kvmkit-root", "ro",
                                            "init=/opt/init"]
        kinds = [d.kind for d in c.devices]
        assert kinds == ["virtio-console", "virtio-fs", "virtio-fs", "virtio-fs", "pvpanic",
                         "i8042", "rtc"]
        console, root, rw, ro = (d.values for d in c.devices[:4])
        assert (ro["path"], ro["readonly"]) == (str(tmp_path), True)      # under the guest's /tmp
        assert console["backend"] == "file" and console["path"] == str(p.console_log)
        assert [x.split("=")[0] for x in console["ports"]] == list(plan.PORTS)
        assert "org.kvmkit.stdin=none" in console["ports"]
        assert (root["path"], root["readonly"]) == ("/", True)
        assert (rw["path"], rw["tag"]) == (str(tmp_path / "out"), "kvmkit-rw0")
        records = (p.run_dir / "job").read_bytes().split(b"\0")
        assert f"rwdir=kvmkit-rw0:{tmp_path / 'out'}".encode() in records
        mounts = [r for r in records if r.split(b"=")[0] in (b"rodir", b"overlay", b"rwdir")]
        assert mounts == [f"rodir=kvmkit-ro0:{tmp_path}".encode(), f"overlay={tmp_path}".encode(),
                          f"rwdir=kvmkit-rw0:{tmp_path / 'out'}".encode()]
        assert b"arg=true" in records
        assert f"cwd={tmp_path}".encode() in records and b"env=PATH=/bin" in records
    finally:
        p.cleanup()
    assert not p.run_dir.exists()


def test_plan_for_a_shell_and_rw_root(tmp_path):
    p = make(tmp_path, argv=[], rw=True, forward_stdin=True, append="loglevel=7")
    try:
        console = p.config.devices[0].values
        assert console["backend"] == "stdio" and len(console["ports"]) == 2
        assert p.config.devices[1].values["readonly"] is False
        words = p.config.kernel.cmdline.split()
        assert "rw" in words and "quiet" not in words and words[-1] == "loglevel=7"
        assert b"tty=1" in (p.run_dir / "job").read_bytes()
    finally:
        p.cleanup()


@pytest.mark.parametrize("kw, words", [
    ({"rwdirs": ["missing"]}, "--rwdir missing: not a directory"),
    ({"overlay_rwdirs": ["/"]}, "use --rw"),
])
def test_plan_rejects(tmp_path, kw, words):
    with pytest.raises(ConfigError, match=words):
        make(tmp_path, **kw)


def test_defaults_are_sized_from_the_host():
    assert 1 <= plan.default_vcpus() <= min(os.cpu_count(), plan.MAX_VCPUS)
    m = plan.default_memory()
    assert plan.MIN_MEMORY <= m <= plan.MAX_MEMORY and m % (1 << 20) == 0


def has_interpreter(elf: bytes) -> bool:
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3   # PT_INTERP
               for i in range(phnum))


def test_the_init_builds_static_and_is_cached(tmp_path):
    path = guest_init.init_binary(tmp_path)
    assert path.parent == tmp_path and os.access(path, os.X_OK)
    assert guest_init.init_binary(tmp_path) == path               # built once
    assert not has_interpreter(path.read_bytes())                  # static: nothing to load
    r = subprocess.run([path], capture_output=True, text=True)     # not PID 1: refuses
    assert r.returncode == 2 and "guest's init" in r.stderr


def test_no_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(guest_init.InitBuildError, match="apt install gcc"):
        guest_init.init_binary(tmp_path)


class FakePlan:
    def __init__(self, tmp_path, status="", log=""):
        self.status_path = tmp_path / "status"
        self.status_path.write_text(status)
        self.console_log = tmp_path / "console.log"
        self.console_log.write_text(log)


@pytest.mark.parametrize("status, code, reason, expected", [
    ("exit 7\n", 0, "guest reset", 7),
    ("signal 15\n", 0, "guest reset", 143),
    ("", EXIT_GUEST_PANIC, "guest kernel panicked (pvpanic)", job.EXIT_GUEST_PANIC),
    ("", job.EXIT_TIMEOUT, "timeout after 5 s", job.EXIT_TIMEOUT),
    ("", 130, "stopped by SIGINT", 130),
    ("", 0, "guest reset", job.EXIT_SANDBOX_ERROR),
    ("", 1, "device virtio-fs.0 failed", job.EXIT_SANDBOX_ERROR),
    ("exit 3\n", EXIT_GUEST_PANIC, "guest kernel panicked (pvpanic)", 3),   # reported, then panicked
])
def test_exit_status_mapping(tmp_path, capsys, status, code, reason, expected):
    assert _outcome(FakePlan(tmp_path, status, "[ 1.0] Kernel panic - not syncing\n"),
                    code, reason) == expected


def test_panic_shows_the_reason_and_the_console_tail(tmp_path, capsys):
    # As the first panic boot printed it: the reason, then a stack dump longer than the tail.
    trace = "".join(f"[ 80.96] ? frame{i}+0x1/0x2\n" for i in range(30))
    _outcome(FakePlan(tmp_path, "", "line1\n[ 80.95] Kernel panic - not syncing: Attempted to "
                      "kill init! exitcode=0x00000100\n" + trace + "[ 80.97]  </TASK>\n"),
             EXIT_GUEST_PANIC, "guest kernel panicked (pvpanic)")
    err = capsys.readouterr().err
    assert "Attempted to kill init" in err and "</TASK>" in err and "line1" not in err


def test_sandbox_flags_and_command_after_dashes():
    args = build_parser().parse_args(["sandbox", "--rwdir", "a", "--rwdir", "b", "--timeout", "5",
                                      "--", "sh", "-c", "exit 7"])
    assert (args.rwdir, args.timeout, args.command) == (["a", "b"], 5.0, ["sh", "-c", "exit 7"])


def test_sandbox_bad_input_is_one_line_and_125(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVMKIT_SANDBOX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bzImage").write_bytes(b"k")
    assert main(["sandbox", "--rwdir", "nope", "--", "true"]) == job.EXIT_SANDBOX_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rwdir nope" in err[0]


def test_run_rejects_host_root_flags_with_a_kernel(tmp_path, capsys):
    assert main(["run", "--kernel", "k", "--rwdir", "."]) == 2
    assert "host-root" in capsys.readouterr().err


@pytest.mark.parametrize("cwd, rwdirs, overlays, expected", [
    ("/home/u/src", [], [], []),                                   # visible through the root
    ("/tmp/build", [], [], ["/tmp/build"]),                        # hidden by the guest's /tmp
    ("/tmp/build/sub", ["/tmp/build"], [], []),                    # an --rwdir shows it
    ("/tmp/a/b", [], ["/tmp/a"], ["/tmp/a"]),                      # one share for both
    ("/var/tmp/x", [], ["/home/u/etc"], ["/var/tmp/x"]),
])
def test_directories_the_guest_tmpfs_would_hide_get_their_own_share(cwd, rwdirs, overlays, expected):
    assert plan.hidden_dirs(cwd, rwdirs, overlays) == expected


def test_a_working_directory_under_tmp_is_shared_read_only(tmp_path):
    p = make(tmp_path)                                             # pytest's tmp_path is under /tmp
    try:
        share = p.config.devices[2].values
        assert (share["path"], share["tag"], share["readonly"]) == (str(tmp_path), "kvmkit-ro0", True)
        assert f"rodir=kvmkit-ro0:{tmp_path}".encode() in (p.run_dir / "job").read_bytes().split(b"\0")
    finally:
        p.cleanup()


@pytest.mark.parametrize("flags, level", [([], logging.ERROR), (["-v"], logging.NOTSET)])
def test_the_nested_kvm_notice_stays_off_the_commands_stderr(monkeypatch, flags, level):
    import kvmkit.cli_sandbox as cs
    logger = logging.getLogger("kvmkit.host_quirks")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(cs, "run_host_root", lambda args, argv, **kw: 0)
    assert main([*flags, "sandbox", "--", "true"]) == 0
    assert logger.level == level


def test_shares_fit_the_open_file_limit_so_nothing_warns_on_stderr(tmp_path):
    # Seen on a boot: two shares at the default sizes each warned that the
    # open-file limit (20000) was too low, on the command's stderr.
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    p = make(tmp_path / "..")                   # cwd under /tmp: root + a read-only share
    try:
        shares = [d.values for d in p.config.devices if d.kind == "virtio-fs"]
        assert len(shares) == 2
        total = sum(s["max_inodes"] + s["max_open_files"] + 1024 for s in shares)
        assert total <= hard or hard == resource.RLIM_INFINITY
    finally:
        p.cleanup()
