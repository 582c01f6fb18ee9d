"""Process-wide counters and histograms, exported at ``/metrics``.

They live in their own registry so tests (and several agents in one process)
do not collide with prometheus-client's global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

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


class PaceReading(Protocol):
    """What an engine reports of its pace (``provider.engine.EngineTimings`` has this shape)."""

    inter_token_p50_s: float | None
    inter_token_p99_s: float | None
    inter_token_max_s: float | None
    inter_token_samples: int
    prefill_slice_s: float | None
    prefill_chunk_tokens: int | None
    prefill_tokens_per_s: float | None


class EngineTimingsCollector(Collector):
    """Inter-token latency and prefill pacing, read from each watched engine at scrape time.

    The engine measures on its generation thread; reading it when scraped
    (rather than copying into gauges on a timer) keeps ``/metrics`` current
    and costs the generation thread nothing. Labelled by model, so agents
    serving different models in one process do not collide.
    """

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], PaceReading]] = {}

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        itl, samples, chunk, budget, speed = families = self._families()
        for model, read in list(self.sources.items()):
            t = read()
            for quantile, value in (
                ("0.5", t.inter_token_p50_s),
                ("0.99", t.inter_token_p99_s),
                ("1", t.inter_token_max_s),
            ):
                if value is not None:
                    itl.add_metric([model, quantile], value)
            samples.add_metric([model], t.inter_token_samples)
            if t.prefill_chunk_tokens is not None:
                chunk.add_metric([model], t.prefill_chunk_tokens)
            # 0 says "no time slicing": chunks are a fixed prefill_step_size.
            budget.add_metric([model], t.prefill_slice_s or 0.0)
            if t.prefill_tokens_per_s is not None:
                speed.add_metric([model], t.prefill_tokens_per_s)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "mlx_provider_inter_token_latency_seconds",
                "Time between consecutive tokens of a request over the engine's latest gaps "
                "(quantile 1 is the max).",
                labels=["model", "quantile"],
            ),
            GaugeMetricFamily(
                "mlx_provider_inter_token_latency_samples",
                "Gaps behind mlx_provider_inter_token_latency_seconds.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "mlx_provider_prefill_slice_tokens",
                "Prompt tokens in the latest prefill chunk.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "mlx_provider_prefill_slice_budget_seconds",
                "Time one prefill chunk should take (0: fixed prefill_step_size chunks).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "mlx_provider_prefill_tokens_per_second",
                "Prefill speed measured on the latest chunk.",
                labels=["model"],
            ),
        )


engine_timings = EngineTimingsCollector()
REGISTRY.register(engine_timings)


def watch_engine(model_id: str, read: Callable[[], PaceReading]) -> None:
    """Export ``read()``'s figures under ``model="<model_id>"`` until :func:`unwatch_engine`."""
    engine_timings.sources[model_id] = read


def unwatch_engine(model_id: str) -> None:
    engine_timings.sources.pop(model_id, None)


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
