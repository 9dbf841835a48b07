"""benchmarks/engine_ipc_cost.py: a small run over a real pipe prints every measurement."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "benchmarks", "engine_ipc_cost.py")


def test_prints_both_sides_of_the_pipe():
    out = subprocess.run([sys.executable, TOOL, "--streams", "4", "--prompt-len", "8", "--steps", "50"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^4 streams, one token each, \d+ bytes per step$", out.stdout, re.M)
    assert re.search(r"encode \+ pickle: +\d+ us per step", out.stdout)
    assert re.search(r"recv \+ unpickle \+ decode: +\d+ us per step \(50 steps\)", out.stdout)
