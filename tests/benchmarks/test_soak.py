"""CI soak: benchmarks/soak.py for 3 minutes on CPU against its own `nanovllm serve` (bundled model).

Mixed streamed / non-streamed / aborted / structured (JSON schema, choice, regex, tool calls;
each checked against its constraint when it finished) / invalid requests; passes only with no 5xx, the KV cache and queues back at zero,
flat memory and a clean drain on SIGTERM. Marked `soak` (part of the default run, i.e. CI;
deselect with -m "not soak").
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINUTES = 3


@pytest.mark.soak
@pytest.mark.slow
def test_soak_three_minutes_on_cpu(tmp_path):
    pytest.importorskip("aiohttp")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--minutes", str(MINUTES),
           "--concurrency", "8", "--interval", "5", "--out-dir", str(tmp_path), "--tag", "ci",
           "--", "--max-model-len", "256", "--max-num-seqs", "16", "--shutdown-timeout", "10"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=MINUTES * 60 + 600, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "ci.json").read_text())
    assert summary["passed"] and summary["server_errors"] == 0 and summary["failed"] == 0
    by_kind = summary["by_kind"]
    assert summary["structured"], "the server refused response_format"  # structured outputs are served (#18)
    assert all(by_kind[k] > 0 for k in ("stream", "plain", "chat", "abort", "structured", "bad")), by_kind
    assert summary["final"] == {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0}
    rows = list(csv.DictReader(open(tmp_path / "ci.csv")))
    assert len(rows) >= MINUTES * 60 // 5 and all(float(row["rss_mb"]) > 0 for row in rows)
    assert (tmp_path / "ci.png").stat().st_size > 10_000
