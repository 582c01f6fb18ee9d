"""Process-wide counters and histograms, exported at ``/metrics``.

They live in their own registry so tests (and several agents in one process)
do not collide with prometheus-client's global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

heartbeats_sent = Counter(
    "mlx_provider_heartbeats_sent", "Heartbeat frames sent to the coordinator.", registry=REGISTRY
)
reconnects = Counter(
    "mlx_provider_reconnects",
    "Connections lost and retried, by cause.",
    ["cause"],
    registry=REGISTRY,
)
jobs = Counter(
    "mlx_provider_jobs", "Inference requests ended, by end status.", ["status"], registry=REGISTRY
)
tokens_generated = Counter(
    "mlx_provider_tokens_generated", "Completion tokens generated.", registry=REGISTRY
)
jobs_in_flight = Gauge(
    "mlx_provider_jobs_in_flight", "Inference requests running now.", registry=REGISTRY
)
ttft_seconds = Histogram(
    "mlx_provider_ttft_seconds",
    "Time from inference_request received to first token sent.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
decode_tps = Histogram(
    "mlx_provider_decode_tokens_per_second",
    "Decode speed of each completed request.",
    buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600),
    registry=REGISTRY,
)


class EngineMemory(Collector):
    """The engine's KV memory and prefix cache, read at every scrape.

    ``source`` returns an object with :class:`provider.engine.MemoryStatus`'s
    fields, or None (nothing is exported then); the agent sets it.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Any] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        status = self.source() if self.source is not None else None
        if status is None:
            return
        gauges = (
            ("memory_budget_bytes", "KV memory budget: running requests plus the prefix cache.",
             status.budget_bytes),
            ("kv_reserved_bytes", "KV memory reserved by running requests.",
             status.reserved_bytes),
            ("requests_waiting_for_memory", "Admitted requests waiting for KV memory.",
             status.waiting_for_memory),
            ("prompt_cache_bytes", "Bytes held by the prefix cache.", status.prompt_cache_bytes),
            ("prompt_cache_max_bytes", "The prefix cache's own bound.",
             status.prompt_cache_max_bytes),
            ("prompt_cache_entries", "Entries in the prefix cache.", status.prompt_cache_entries),
            ("prompt_cache_hit_ratio", "Prefix cache lookups that reused tokens, over lookups.",
             status.hit_rate),
        )  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"mlx_provider_{name}", doc, value=value)
        counters = (
            ("prompt_cache_lookups", "Prefix cache lookups.", status.prompt_cache_lookups),
            ("prompt_cache_hits", "Prefix cache lookups that reused tokens.",
             status.prompt_cache_hits),
            ("prompt_tokens_looked_up", "Prompt tokens looked up in the prefix cache.",
             status.prompt_tokens),
            ("prompt_tokens_cached", "Prompt tokens served from the prefix cache.",
             status.cached_tokens),
        )  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(f"mlx_provider_{name}", doc, value=value)


engine_memory = EngineMemory()
REGISTRY.register(engine_memory)
