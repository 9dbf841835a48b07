"""`nanovllm serve --request-timeline PATH`: a real server (bundled model), concurrent streams, the CSV and its plot."""

import asyncio
import csv
import json
import subprocess
import sys
import time

import httpx
import pytest

from nanovllm.bench.timeline import STAGES, breakdown, load, load_steps, plot, step_summary
from nanovllm.serve.timeline import validate_timeline_path
from tests.serve.conftest import free_port

STARTUP_TIMEOUT_S = 300
NUM_STREAMS = 4
MAX_TOKENS = 6


def start_server(timeline_path, log_path):
    port = free_port()
    cmd = [sys.executable, "-m", "nanovllm.cli.main", "serve", "--port", str(port), "--max-model-len", "256",
           "--max-num-seqs", "8", "--max-prefill-tokens-while-decoding", "24", "--no-web-ui",
           "--request-timeline", str(timeline_path)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server not healthy in time")
        time.sleep(0.5)


async def stream_one(client, url, i):
    body = {"prompt": f"Request {i}: the river flows past the old city and", "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        buffer = ""
        async for data in resp.aiter_text():
            buffer += data
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                events.append(event)
    return events


async def stream_all(url):
    async with httpx.AsyncClient() as client:
        return await asyncio.gather(*(stream_one(client, url, i) for i in range(NUM_STREAMS)))


@pytest.fixture(scope="module")
def served_timeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("timeline")
    path = tmp / "timeline.csv"
    proc, url = start_server(path, tmp / "server.log")
    try:
        streams = asyncio.run(stream_all(url))
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 200  # untimed routes pass through the middleware untouched
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully, then the CSV is written
        proc.wait(60)
    log = open(tmp / "server.log").read()
    assert "request timeline written to" in log, log[-3000:]
    return path, streams


def test_csv_has_every_stage_in_order_and_one_sent_event_per_sse_event(served_timeline):
    path, streams = served_timeline
    rows = list(csv.DictReader(open(path)))
    by_req = {}
    for r in rows:
        by_req.setdefault(int(r["http_request"]), []).append(r)
    assert sorted(by_req) == list(range(NUM_STREAMS))
    sse_counts = sorted(len(s) for s in streams)
    sent_counts = sorted(sum(r["event"] == "sent" for r in rs) for rs in by_req.values())
    assert sent_counts == sse_counts  # one stamp per body chunk = per SSE event the client got
    for rs in by_req.values():
        t = {r["event"]: float(r["t_ms"]) for r in rs if r["event"] != "sent"}
        assert list(t) == ["arrival", "submitted", "queued", "first_scheduled", "first_token", "finished"]
        assert t["arrival"] <= t["submitted"] <= t["queued"] <= t["first_scheduled"] <= t["first_token"]
        assert t["first_token"] <= t["finished"]
        sent = [float(r["t_ms"]) for r in rs if r["event"] == "sent"]
        assert sent == sorted(sent) and sent[0] >= t["first_token"] and sent[-1] >= t["finished"]
        assert len({r["request_id"] for r in rs}) == 1 and rs[0]["request_id"].startswith("cmpl-")
    assert min(float(r["t_ms"]) for r in rows if r["event"] == "arrival") == 0.0


def test_step_log_accounts_for_every_token(served_timeline):
    path, streams = served_timeline
    steps = load_steps(str(path))
    assert steps
    assert all(s.t_end >= s.t_start for s in steps)
    assert all(b.t_start >= a.t_end for a, b in zip(steps, steps[1:]))  # one engine thread, one step at a time
    prompt_tokens = sum(json.loads(events[-2][len("data: "):])["usage"]["prompt_tokens"] for events in streams)
    # every prompt token is computed once as prefill; each request then computes MAX_TOKENS - 1 decode tokens
    assert sum(s.num_prefill_tokens for s in steps) == prompt_tokens
    assert sum(s.num_tokens for s in steps) == prompt_tokens + NUM_STREAMS * (MAX_TOKENS - 1)
    assert max(s.num_seqs for s in steps) == NUM_STREAMS
    summary = step_summary(steps)
    assert summary["prefill"]["steps"] >= 1 and summary["decode"]["steps"] >= MAX_TOKENS - 2


def test_streams_are_complete_with_the_timeline_on(served_timeline):
    _, streams = served_timeline
    for events in streams:
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_plot_attributes_ttft_to_stages(served_timeline, tmp_path):
    path, _ = served_timeline
    requests = load(str(path))
    assert len(requests) == NUM_STREAMS
    for r in requests:
        stages = r.stages()
        assert stages is not None and all(v >= 0 for v in stages.values())
        assert sum(stages.values()) == pytest.approx(r.ttft, abs=1e-6)  # the stages cover TTFT exactly
        assert len(r.send_gaps()) == len(r.sent) - 1
    summary = breakdown(requests)
    assert summary["ttft_p99_ms"] >= summary["ttft_p50_ms"] > 0
    assert set(summary["tail"]) == {name for name, _, _ in STAGES}
    png = plot(requests, summary, str(tmp_path / "t.png"), steps=load_steps(str(path)))
    later = load(str(path), skip_first=2)  # a warm-up run left out
    assert [r.http_request for r in later] == [2, 3] and later[0].events == requests[2].events
    start = min(r.events["arrival"] for r in later)
    assert all(st.t_end > start for st in load_steps(str(path), since_ms=start))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_timeline_cli(served_timeline, tmp_path):
    path, _ = served_timeline
    out = subprocess.run([sys.executable, "-m", "nanovllm.cli.main", "bench", "timeline", str(path), "--png",
                          str(tmp_path / "cli.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TTFT p50" in out.stdout and "prefill steps:" in out.stdout and (tmp_path / "cli.png").exists()


@pytest.mark.parametrize("bad", ["", "/nonexistent-dir/x.csv", "/tmp"])
def test_bad_timeline_paths_are_refused(bad):
    with pytest.raises(ValueError, match="--request-timeline"):
        validate_timeline_path(bad)


def test_serve_refuses_a_bad_path_before_loading_the_model():
    out = subprocess.run([sys.executable, "-m", "nanovllm.cli.main", "serve", "--request-timeline",
                          "/nonexistent-dir/t.csv"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr
