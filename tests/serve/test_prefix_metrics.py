"""The prefix-cache hit rate on /metrics: a gauge next to the query and hit counters."""

from prometheus_client.parser import text_string_to_metric_families

from nanovllm.serve.metrics import ServerMetrics


class FakeEngine:
    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return self._stats


def samples(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_hit_rate_gauge_follows_the_engine_stats():
    engine = FakeEngine({"prefix_cache_queries": 400, "prefix_cache_hits": 300, "prefix_cache_hit_rate": 0.75})
    got = samples(ServerMetrics(engine, "m"))
    assert got["nanovllm:prefix_cache_hit_rate"] == 0.75
    assert got["nanovllm:prefix_cache_queries_total"] == 400 and got["nanovllm:prefix_cache_hits_total"] == 300
    assert samples(ServerMetrics(FakeEngine({}), "m"))["nanovllm:prefix_cache_hit_rate"] == 0.0
