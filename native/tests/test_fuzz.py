"""libFuzzer (with ASan and UBSan) on kvmkit-native's C: native/fuzz/run.

The split queue gets 30 s; virtio-blk's request handling and virtio-net's
transmit checks 15 s each.  Each prints how many inputs ran."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "fuzz" / "run"
TARGETS = {"vq": 30, "blk": 15, "net": 15}


@pytest.mark.skipif(shutil.which("clang") is None,
                    reason="clang is not installed (apt-get install clang libclang-rt-14-dev, "
                           "or scripts/setup)")
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_the_c(target, capsys):
    seconds = TARGETS[target]
    proc = subprocess.run([str(RUN), "--target", target, "--seconds", str(seconds)],
                          capture_output=True, text=True,
                          timeout=seconds + 300)         # + building the harness
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(rf"fuzz_{target}: (\d+) inputs in (\d+) s, no crash", last)
    assert m, output[-4000:]
    assert int(m.group(1)) > 0
    with capsys.disabled():
        print(f"\n{last}")
