"""30 seconds of libFuzzer (with ASan and UBSan) on the C split queue: native/fuzz/run."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "fuzz" / "run"
SECONDS = 30


@pytest.mark.skipif(shutil.which("clang") is None,
                    reason="clang is not installed (apt-get install clang libclang-rt-14-dev, "
                           "or scripts/setup)")
def test_fuzz_the_c_queue(capsys):
    proc = subprocess.run([str(RUN), "--seconds", str(SECONDS)], capture_output=True, text=True,
                          timeout=SECONDS + 300)         # + building the harness
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"fuzz_vq: (\d+) inputs in (\d+) s, no crash", last)
    assert m, output[-4000:]
    assert int(m.group(1)) > 0
    with capsys.disabled():
        print(f"\n{last}")
