"""From ``kvmkit sandbox`` / host-root ``kvmkit run`` options to a machine.

The guest's root is the host's ``/`` over virtio-fs (tag ``kvmkit-root``,
read-only unless ``rw``), mounted by the kernel itself
(``rootfstype=virtiofs root=kvmkit-root``), and its init is ours
(:mod:`.guest_init`).  A virtio console carries hvc0 (the kernel's log, to a
file, or your terminal for a shell) and five ports: the job, the status, and
the command's stdin, stdout and stderr.  pvpanic reports a panic, the i8042
the reboot that ends the VM (``reboot=k``), the RTC the time.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from ..config import ConfigError, MachineConfig, machine_from_dict
from .job import Job

__all__ = ["Options", "Plan", "make_plan", "default_memory", "default_vcpus", "ROOT_TAG",
           "PORTS"]

ROOT_TAG = "kvmkit-root"
PORTS = ("org.kvmkit.job", "org.kvmkit.status", "org.kvmkit.stdin", "org.kvmkit.stdout",
         "org.kvmkit.stderr")
GUEST_TMPFS = ("/tmp", "/var/tmp", "/run", "/dev")   # the guest's own: host content hidden
MAX_VCPUS = 8                      # the kit's kernels have NR_CPUS=8; more only slows start-up
MIN_MEMORY = 256 << 20
MAX_MEMORY = 2 << 30


def fs_limits(shares: int) -> dict:
    """virtio-fs table sizes that fit every share within the open-file limit
    kvmkit can raise itself to (each known inode holds a descriptor), so no
    share warns on stderr, which is the command's."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    per = max((hard - 512) // max(shares, 1), 2048)
    open_files = min(4096, max(16, per // 8))
    return {"max_inodes": min(262144, max(16, per - open_files - 1024)),
            "max_open_files": open_files}


def default_vcpus() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_VCPUS))


def default_memory() -> int:
    """A quarter of the host's RAM, 256 MiB to 2 GiB, in whole MiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 * MIN_MEMORY
    return max(MIN_MEMORY, min(total // 4, MAX_MEMORY)) >> 20 << 20


@dataclasses.dataclass
class Options:
    kernel: Path
    argv: list[str]                                  # empty: a shell on the console
    cwd: Path
    memory: str | None = None
    vcpus: int | None = None
    append: str = ""
    rw: bool = False
    rwdirs: list[str] = dataclasses.field(default_factory=list)
    overlay_rwdirs: list[str] = dataclasses.field(default_factory=list)
    forward_stdin: bool = False
    name: str | None = None
    host_quirks: str | None = None
    devices: list[dict] = dataclasses.field(default_factory=list)
    env: dict[str, str] | None = None


@dataclasses.dataclass
class Plan:
    config: MachineConfig
    run_dir: Path
    status_path: Path
    console_log: Path | None

    def cleanup(self) -> None:
        for p in self.run_dir.iterdir():
            p.unlink(missing_ok=True)
        self.run_dir.rmdir()


def _host_dir(text: str, flag: str, cwd: Path) -> str:
    path = (cwd / text).resolve()
    if not path.is_dir():
        raise ConfigError(f"{flag} {text}: not a directory on the host; create it first")
    return str(path)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def hidden_dirs(cwd: str, rwdirs: list[str], overlays: list[str]) -> list[str]:
    """Host directories the guest must see that its own tmpfs would hide: the
    working directory and overlay lower layers under /tmp, /var/tmp, /run,
    /dev (each gets a read-only share of its own; an --rwdir shows itself)."""
    out: list[str] = []
    for path in [cwd, *overlays]:
        if not any(_under(path, t) for t in GUEST_TMPFS):
            continue
        if any(_under(path, d) for d in rwdirs + out):
            continue
        out = [d for d in out if not _under(d, path)] + [path]
    return out


def make_plan(opts: Options, init: Path) -> Plan:
    rwdirs = [_host_dir(d, "--rwdir", opts.cwd) for d in opts.rwdirs]
    overlays = [_host_dir(d, "--overlay-rwdir", opts.cwd) for d in opts.overlay_rwdirs]
    for d in rwdirs + overlays:
        if d == "/":
            raise ConfigError("--rwdir / and --overlay-rwdir /: use --rw for a writable root")
    interactive = not opts.argv
    cwd = str(opts.cwd.resolve())
    rodirs = hidden_dirs(cwd, rwdirs, overlays)
    job = Job(argv=list(opts.argv), cwd=cwd,
              env=dict(os.environ if opts.env is None else opts.env), tty=interactive,
              rwdirs=[(f"kvmkit-rw{i}", d) for i, d in enumerate(rwdirs)],
              rodirs=[(f"kvmkit-ro{i}", d) for i, d in enumerate(rodirs)], overlays=overlays)
    try:
        job_bytes = job.encode()
    except ValueError as e:
        raise ConfigError(f"the command: {e}") from None
    base = os.environ.get("XDG_RUNTIME_DIR")
    run_dir = Path(tempfile.mkdtemp(prefix="kvmkit-sandbox-",
                                    dir=base if base and os.path.isdir(base) else None))
    (run_dir / "job").write_bytes(job_bytes)
    status = run_dir / "status"
    status.touch()
    log = None if interactive else run_dir / "console.log"
    job_port, status_port, stdin_port, stdout_port, stderr_port = PORTS
    ports = [f"{job_port}=feed:{run_dir / 'job'}", f"{status_port}=file:{status}"]
    if not interactive:
        ports += [f"{stdin_port}={'stdin' if opts.forward_stdin else 'none'}",
                  f"{stdout_port}=stdout", f"{stderr_port}=stderr"]
    console = {"kind": "virtio-console", "ports": ports}
    console.update({"backend": "stdio"} if interactive else {"backend": "file", "path": str(log)})
    devices = [console, {"kind": "virtio-fs", "path": "/", "tag": ROOT_TAG, "readonly": not opts.rw}]
    devices += [{"kind": "virtio-fs", "path": d, "tag": f"kvmkit-rw{i}"}
                for i, d in enumerate(rwdirs)]
    devices += [{"kind": "virtio-fs", "path": d, "tag": f"kvmkit-ro{i}", "readonly": True}
                for i, d in enumerate(rodirs)]
    devices += [{"kind": "pvpanic"}, {"kind": "i8042"}, {"kind": "rtc"}]
    shares = [d for d in devices if d["kind"] == "virtio-fs"]
    for d in shares:
        d.update(fs_limits(len(shares)))
    flagged = {d["kind"] for d in opts.devices}
    devices = [d for d in devices if d["kind"] not in flagged or d["kind"] == "virtio-fs"]
    devices += opts.devices
    cmdline = (f"console=hvc0 {'' if interactive else 'quiet '}reboot=k panic=-1 "
               f"rootfstype=virtiofs root={ROOT_TAG} {'rw' if opts.rw else 'ro'} "
               f"init={init} {opts.append}").strip()
    machine = {"name": opts.name or f"sandbox-{os.getpid()}",
               "memory": opts.memory or default_memory(),
               "vcpus": opts.vcpus or default_vcpus()}
    if opts.host_quirks:
        machine["host_quirks"] = opts.host_quirks
    data = {"machine": machine,
            "kernel": {"image": str(Path(opts.kernel).absolute()), "cmdline": cmdline},
            "device": devices}
    try:
        config = machine_from_dict(data, source=None, base_dir=opts.cwd, default_name="sandbox")
    except BaseException:
        Plan(None, run_dir, status, log).cleanup()
        raise
    return Plan(config, run_dir, status, log)
