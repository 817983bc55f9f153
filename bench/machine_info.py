"""The machine a benchmark ran on, printed at the top of every bench/ report."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def describe() -> str:
    kvm = "paravirtual nested KVM (kvm_pvm)" if os.path.isdir("/sys/module/kvm_pvm") else "hardware KVM"
    return (f"{platform.node()}: {platform.platform()}, Python {platform.python_version()}\n"
            f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} "
            f"usable), {kvm}")
