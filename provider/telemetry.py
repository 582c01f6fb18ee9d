"""Process-wide counters and histograms, exported at ``/metrics``.

They live in their own registry so tests (and several agents in one process)
do not collide with prometheus-client's global one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
