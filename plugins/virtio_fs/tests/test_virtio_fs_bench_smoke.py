"""bench/virtio_fs.py runs (tiny sizes) and prints its table: one row per
workload with both timings and a ratio."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[3] / "bench" / "virtio_fs.py"


def test_bench_quick_run_prints_every_row(tmp_path):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("the benchmark mounts FUSE: needs /dev/fuse and root")
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\| (.+?) \| (\d+) ms \| (\d+) ms \| ([\d.]+)x \|", r.stdout, re.M)
    assert [name.split(",")[0].split(" x ")[0].split(" of ")[0] for name, *_ in rows] == [
        "sequential write", "sequential read", "4 KiB random reads", "stat", rows[4][0]]
    assert rows[4][0].startswith("untar")
    assert not os.listdir(tmp_path)                     # its work directory is gone
    assert "kvmkit-fs-bench" not in open("/proc/mounts").read()   # and nothing stays mounted
