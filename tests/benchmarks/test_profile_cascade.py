"""benchmarks/profile_cascade.py on the CPU: both (a) engines and the (b) request profiled, reported per step."""

import os
import re
import sys

from tiny_models import build_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import profile_cascade as pc  # noqa: E402


def test_profile_cascade_reports_both_engines_and_the_cached_request(tmp_path, capsys):
    model = build_tiny_model("qwen3", str(tmp_path / "m"), max_position_embeddings=4096)
    pc.main(["--model", model, "--device", "cpu", "--dtype", "float32", "--num-requests", "4", "--prefix-len", "64",
             "--unique-len", "8", "--steps", "3", "--ttft-repeats", "2", "--cascade-mode", "force"])
    out = capsys.readouterr().out
    heads = re.findall(r"^(\(\w\)[^:]*): wall ([\d.]+) ms/(\w+); GPU per step events ([\d.]+) .*cascade steps (\d+)",
                       out, re.M)
    assert [(h[0], h[2]) for h in heads] == [("(a) cascade_attention=force", "step"), ("(a) cascade_attention=off", "step"),
                                             ("(b) a cached-prefix request, add to first token", "request")]
    assert all(float(h[1]) > 0 and float(h[3]) > 0 for h in heads)  # CPU: the timeline's host launch-to-resolve
    # every measured decode step of the forced engine had a plan (4 requests share 4 whole blocks); none without
    assert [int(h[4]) for h in heads[:2]] == [3, 0]
    phases = re.findall(r"host phases per engine step: schedule ([\d.]+) ms, build_step ([\d.]+) ms, "
                        r"prepare_inputs ([\d.]+) ms", out)
    assert len(phases) == 3 and all(float(p) > 0 for p in phases[0])
    assert len(re.findall(r"under the profiler: wall [\d.]+ ms/(?:step|request), kernels", out)) == 3
