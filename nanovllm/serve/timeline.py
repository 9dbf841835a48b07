"""Per-request timeline of a served run (`nanovllm serve --request-timeline PATH`), for attributing TTFT.

Off unless asked for: nothing of this module is installed then. When on, an ASGI middleware stamps
each generation request's arrival (before its body is read) and every response body chunk sent
(one SSE event each), the engine's own stamps (RequestMetrics: submitted, queued, first scheduled,
first token, finished) are collected when each request finishes, and everything is written as one
CSV when the server stops, one row per event:

    http_request, request_id, event, t_ms

`t_ms` is milliseconds since the first arrival (one monotonic clock for both threads). Events, in
order: arrival (HTTP), submitted (handed to the engine, after parsing and tokenization), queued
(the engine thread took it), first_scheduled (its first prefill chunk), first_token (the engine
produced it), sent (each body chunk written), finished (engine). `nanovllm bench timeline CSV`
plots it and splits TTFT into these stages. Next to it, PATH's stem + `_steps.csv` lists every
engine step (`t_start_ms, t_end_ms, num_tokens, num_prefill_tokens, num_seqs, num_running,
num_waiting`; the tokens of the step scheduled in that call, which with async scheduling runs on
the GPU while the call waits for the previous one), to spot long mixed steps. Everything is kept
in memory until shutdown: this is a tool for benchmark runs.
"""

from __future__ import annotations

import contextvars
import csv
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
ENGINE_EVENTS = ("submitted", "queued", "first_scheduled", "first_token", "finished")
_METRIC_OF_EVENT = {"submitted": "arrival_time", "queued": "queued_time", "first_scheduled": "first_scheduled_time",
                    "first_token": "first_token_time", "finished": "finished_time"}
CSV_FIELDS = ("http_request", "request_id", "event", "t_ms")
STEP_FIELDS = ("t_start_ms", "t_end_ms", "num_tokens", "num_prefill_tokens", "num_seqs", "num_running", "num_waiting")
_STEP_STATS = ("last_step_num_tokens", "last_step_num_prefill_tokens", "last_step_num_seqs", "num_running",
               "num_waiting")


def steps_path(path: str) -> str:
    """Where the step log of the timeline at `path` goes."""
    return os.path.splitext(path)[0] + "_steps.csv"


def validate_timeline_path(path: str) -> str:
    """The absolute path to write, or ValueError saying what to change (checked before the model loads)."""
    if not isinstance(path, str) or not path:
        raise ValueError("--request-timeline needs a file path, e.g. --request-timeline /tmp/timeline.csv")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"--request-timeline {path} is a directory: give a file path such as {path}/timeline.csv")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"--request-timeline {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--request-timeline {path}: the directory {parent} is not writable")
    return path


@dataclass
class _HttpRecord:
    index: int
    arrival: float
    request_ids: list[str] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)


_current: contextvars.ContextVar[Optional[_HttpRecord]] = contextvars.ContextVar("nanovllm_timeline", default=None)


class RequestTimeline:
    """Collects the stamps (event loop: HTTP side; engine thread: RequestMetrics) and writes the CSV."""

    def __init__(self, path: str) -> None:
        self.path = validate_timeline_path(path)
        self._lock = threading.Lock()
        self._http: list[_HttpRecord] = []
        self._engine: dict[str, object] = {}  # request id -> RequestMetrics snapshot
        self._steps: list[tuple] = []  # (t_start, t_end, *_STEP_STATS), appended by the engine thread

    # event loop side
    def begin(self) -> _HttpRecord:
        with self._lock:
            rec = _HttpRecord(len(self._http), time.monotonic())
            self._http.append(rec)
        return rec

    # RequestObserver (engine thread)
    def on_first_token(self, ttft_s: float) -> None:
        pass

    def on_inter_token(self, itl_s: float) -> None:
        pass

    def on_finished(self, output, e2e_s: float, num_generation_tokens: int) -> None:
        if output.metrics is not None:
            with self._lock:
                self._engine[output.request_id] = output.metrics

    def on_step(self, t_start: float, t_end: float, stats: dict) -> None:
        self._steps.append((t_start, t_end) + tuple(stats.get(k, 0) for k in _STEP_STATS))

    def _t0(self) -> Optional[float]:
        with self._lock:
            return min((rec.arrival for rec in self._http), default=None)

    def step_rows(self) -> list[dict]:
        t0 = self._t0()
        if t0 is None:
            return []
        return [dict(zip(STEP_FIELDS, (round((a - t0) * 1000.0, 3), round((b - t0) * 1000.0, 3)) + tuple(rest)))
                for a, b, *rest in list(self._steps)]

    def rows(self) -> list[dict]:
        with self._lock:
            http = list(self._http)
            engine = dict(self._engine)
        if not http:
            return []
        t0 = min(rec.arrival for rec in http)
        rows = []

        def add(rec, rid, event, t):
            rows.append({"http_request": rec.index, "request_id": rid, "event": event,
                         "t_ms": round((t - t0) * 1000.0, 3)})

        for rec in http:
            rid0 = rec.request_ids[0] if rec.request_ids else ""
            add(rec, rid0, "arrival", rec.arrival)
            for rid in rec.request_ids:
                metrics = engine.get(rid)
                for event in ENGINE_EVENTS:
                    t = getattr(metrics, _METRIC_OF_EVENT[event], None) if metrics is not None else None
                    if t is not None:
                        add(rec, rid, event, t)
            for t in rec.sent:
                add(rec, rid0, "sent", t)
        return rows

    def write(self) -> str:
        """Write the request CSV and the step CSV beside it; returns the request CSV's path."""
        for path, fields, rows in ((self.path, CSV_FIELDS, self.rows()),
                                   (steps_path(self.path), STEP_FIELDS, self.step_rows())):
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
        return self.path


class TimelineEngine:
    """The AsyncLLMEngine as the routes see it, noting which engine requests each HTTP request made."""

    def __init__(self, engine, timeline: RequestTimeline) -> None:
        self._engine = engine
        self._timeline = timeline
        engine.add_observer(timeline)
        engine.add_step_observer(timeline.on_step)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def add_requests(self, requests, arrival_time=None):
        streams = await self._engine.add_requests(requests, arrival_time)
        rec = _current.get()
        if rec is not None:
            rec.request_ids.extend(stream.request_id for stream in streams)
        return streams

    async def add_request(self, prompt, params=None, request_id=None, arrival_time=None):
        [stream] = await self.add_requests([(prompt, params, request_id)], arrival_time)
        return stream


class TimelineMiddleware:
    """ASGI middleware: stamps the arrival and each body chunk of the generation routes."""

    def __init__(self, app, timeline: RequestTimeline) -> None:
        self.app = app
        self.timeline = timeline

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        rec = self.timeline.begin()
        token = _current.set(rec)

        async def stamped_send(message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and message.get("body"):
                rec.sent.append(time.monotonic())

        try:
            await self.app(scope, receive, stamped_send)
        finally:
            _current.reset(token)

