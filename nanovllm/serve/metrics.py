"""Prometheus metrics of the server, in its own CollectorRegistry (names documented in docs/serving.md).

Gauges and counters are read from the engine's stats snapshot at scrape time; latency
histograms are fed by the AsyncLLMEngine observer hooks on the engine thread (prometheus
client metrics are thread-safe).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanovllm.engine.async_engine import AsyncLLMEngine
from nanovllm.outputs import RequestOutput

PREFIX = "nanovllm:"
# Buckets in seconds, from a fast GPU decode step to a slow CPU request under load.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges and engine-wide counters, read from AsyncLLMEngine.stats() at each scrape."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return self.collect(empty=True)

    def collect(self, empty: bool = False):
        s = {} if empty else self.engine.stats()
        gauges = [
            ("num_requests_running", "Requests in the running batch.", s.get("num_running", 0)),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0)),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks held by live requests (0 to 1).",
             s.get("kv_cache_usage", 0.0)),
            ("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up, since start "
             "(0 to 1).", s.get("prefix_cache_hit_rate", 0.0)),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(value))
            yield g
        counters = [
            ("prompt_tokens", "Prompt tokens of accepted requests.", s.get("prompt_tokens_total", 0)),
            ("generation_tokens", "Generated tokens.", s.get("generation_tokens_total", 0)),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.get("prefix_cache_queries", 0)),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.get("prefix_cache_hits", 0)),
            ("num_preemptions", "Requests preempted to free KV-cache blocks.", s.get("preemptions_total", 0)),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])  # exposed as <name>_total
            c.add_metric([self.model_name], float(value))
            yield c


class ServerMetrics:
    """One server's metrics: register with `engine.add_observer`, render with `render()`."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))

        def hist(name, doc, buckets):
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first generated token.",
                         TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between two engine steps that gave a request tokens.",
                        ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token of finished requests.",
                        E2E_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Prompt length of finished requests.", TOKEN_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Generated tokens of finished requests (all n choices).",
                            TOKEN_BUCKETS)
        self._success = Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name

    # ------------------------------------------------------------------ RequestObserver
    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, output: RequestOutput, e2e_s: float, num_generation_tokens: int) -> None:
        self.e2e.observe(e2e_s)
        self.prompt_len.observe(len(output.prompt_token_ids))
        self.gen_len.observe(num_generation_tokens)
        reason = output.outputs[0].finish_reason if output.outputs else None
        self._success.labels(self._model_name, reason or "unknown").inc()

    # ------------------------------------------------------------------ exposition
    def render(self) -> bytes:
        return generate_latest(self.registry)
