"""``/metrics``: Prometheus text format through ``prometheus_client``, vLLM's metric names with ``llmlab:``.

Engine gauges and counters (requests running/waiting, KV-cache usage, prefix-cache queries/hits, prompt and
generation tokens) are read at scrape time from the ``LLM.stats`` the engine thread publishes after every
step. Latency histograms (time to first token, time per output token, end-to-end) and request outcomes (by
finish reason, and by HTTP status) are recorded as requests go. Each server has its own registry, so several
servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # no *_created series: vLLM does not export them either

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
    20,
    40,
)

# (metric name, help, LLM.stats key) for the gauges and counters read from the engines.
_GAUGES = [
    ("llmlab:num_requests_running", "Requests in the running batch.", "num_running"),
    ("llmlab:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    (
        "llmlab:kv_cache_usage_perc",
        "Fraction of KV-cache blocks held by requests (1 = full).",
        "kv_cache_usage",
    ),
    ("llmlab:kv_cache_blocks_used", "KV-cache blocks held by requests.", "kv_blocks_used"),
    ("llmlab:kv_cache_blocks_cached", "Unreferenced prefix-cache blocks (reclaimable).", "kv_blocks_cached"),
    ("llmlab:kv_cache_capacity_tokens", "Tokens the KV-cache pool holds.", "kv_capacity_tokens"),
]
_COUNTERS = [
    ("llmlab:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("llmlab:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("llmlab:prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total"),
    ("llmlab:generation_tokens", "Tokens generated.", "generation_tokens_total"),
    ("llmlab:num_preemptions", "Requests preempted for want of KV blocks.", "preemptions"),
    ("llmlab:spec_decode_num_draft_tokens", "Speculative tokens drafted.", "spec_draft_tokens"),
    ("llmlab:spec_decode_num_accepted_tokens", "Speculative tokens accepted.", "spec_accepted_tokens"),
]


class _EngineCollector:
    """Reads the engines' published stats at scrape time (labelled by ``model_name``)."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, float]]]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = dict(self.stats())
        for name, help_text, key in _GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["model_name"])
            for model, s in stats.items():
                family.add_metric([model], float(s.get(key, 0.0)))
            yield family
        for name, help_text, key in _COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["model_name"])
            for model, s in stats.items():
                family.add_metric([model], float(s.get(key, 0.0)))
            yield family
        rate = GaugeMetricFamily(
            "llmlab:prefix_cache_hit_rate",
            "Prefix-cache hits / queries (prompt tokens).",
            labels=["model_name"],
        )
        for model, s in stats.items():
            queries = s.get("prefix_cache_queries", 0)
            rate.add_metric([model], s.get("prefix_cache_hits", 0) / queries if queries else 0.0)
        yield rate


class ServerMetrics:
    """One server's registry: engine collector + request histograms and outcome counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "llmlab:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "llmlab:time_per_output_token_seconds",
            "Time between generated tokens (inter-token latency).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "llmlab:e2e_request_latency_seconds",
            "Time from arrival to the request's end.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.success = Counter(
            "llmlab:request_success",
            "Finished requests by finish reason (stop, length, abort, error).",
            ["finished_reason"],
            registry=self.registry,
        )
        self.http = Counter(
            "llmlab:http_requests", "HTTP responses by status code.", ["status"], registry=self.registry
        )

    def attach(self, stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        self.registry.register(_EngineCollector(stats))

    def finished(self, reason: str | None) -> None:
        self.success.labels(finished_reason=reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
