"""The agent's local status endpoint: health, status and Prometheus metrics.

:class:`StatusServer` serves, on the loopback interface only:

- ``GET /healthz``: ``200 ok`` while healthy (connected, and ready or busy),
  else ``503`` with the reason, for launchd-adjacent monitors and scripts;
- ``GET /status``: the session's status as JSON (see :func:`format_status_table`
  for the keys), read by ``mlx-provider status``;
- ``GET /metrics``: :data:`provider.telemetry.REGISTRY` in the Prometheus
  text format.

It knows nothing about the session: it is built from two callables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from provider import telemetry
from provider.config import is_loopback
from provider.logs import get_logger

__all__ = [
    "DEFAULT_STATUS_PORT",
    "StatusServer",
    "format_status_table",
]

DEFAULT_STATUS_PORT = 8765

log = get_logger("status")

HealthCheck = Callable[[], "bool | tuple[bool, str]"]


def _check_loopback(host: str) -> None:
    if not is_loopback(host):
        # The status page shows the provider id and traffic: keep it on this Mac.
        raise ValueError(
            f"status_host must be a loopback address (127.0.0.1, ::1 or localhost), got {host!r}"
        )


class StatusServer:
    """HTTP server for ``/healthz``, ``/status`` and ``/metrics``.

    ``get_status()`` returns the JSON-able dict served at ``/status``.
    ``is_healthy()`` returns a bool, or ``(healthy, reason)``; when it says
    unhealthy without a reason, the reason is made from the status's
    ``connection``, ``state`` and ``state_reason``. Both are called on the
    event loop for each request, so they must be quick and must not block.

    ``host`` must be a loopback address: anything else raises
    :exc:`ValueError`. ``port`` 0 picks a free port; :attr:`port` and
    :attr:`url` tell which once :meth:`start` returned.
    """

    def __init__(
        self,
        get_status: Callable[[], Mapping[str, Any]],
        is_healthy: HealthCheck,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_STATUS_PORT,
    ) -> None:
        _check_loopback(host)
        self.get_status = get_status
        self.is_healthy = is_healthy
        self.host = host.strip("[]")
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8765``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        """The aiohttp application, for embedding or testing."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        """Bind and serve. Raises :exc:`OSError` when the port is taken."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("status server listening", extra={"url": self.url})

    async def stop(self) -> None:
        """Stop serving. Safe to call when not started."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _healthz(self, request: web.Request) -> web.Response:
        verdict = self.is_healthy()
        healthy, reason = verdict if isinstance(verdict, tuple) else (verdict, "")
        if healthy:
            return web.Response(text="ok\n")
        if not reason:
            reason = _unhealthy_reason(self.get_status())
        return web.Response(status=503, text=f"{reason}\n")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.get_status()))

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(telemetry.REGISTRY),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


def _unhealthy_reason(status: Mapping[str, Any]) -> str:
    reason = f"connection {status.get('connection', 'unknown')}, state {status.get('state', '?')}"
    if status.get("state_reason"):
        reason += f": {status['state_reason']}"
    return reason


# --------------------------------------------------------------------------
# The status table


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _kv_rows(memory: Mapping[str, Any]) -> list[tuple[str, str]]:
    """KV memory and prefix cache rows, when the engine reported them."""
    if "kv_budget_bytes" not in memory:
        return []
    cache = memory.get("prompt_cache") or {}
    hit_rate = cache.get("hit_rate")
    rate = f"{hit_rate:.0%}" if isinstance(hit_rate, int | float) else "-"
    return [
        (
            "KV memory",
            f"{_bytes(memory.get('kv_reserved_bytes'))} reserved of "
            f"{_bytes(memory.get('kv_budget_bytes'))}",
        ),
        (
            "prompt cache",
            f"{_bytes(cache.get('bytes'))} of {_bytes(cache.get('max_bytes'))}, "
            f"{_text(cache.get('entries'))} entries, hit rate {rate}",
        ),
    ]


def _pct(value: Any) -> str:
    return f"{value:.1f}%" if isinstance(value, int | float) else "-"


def _chip_text(host: Mapping[str, Any]) -> str:
    cores = [
        f"{host[key]} {label}"
        for key, label in (("cpu_cores", "CPU"), ("gpu_cores", "GPU"))
        if isinstance(host.get(key), int)
    ]
    text = _text(host.get("chip"))
    return f"{text} ({', '.join(cores)} cores)" if cores else text


def _host_text(host: Mapping[str, Any]) -> str:
    if not host:
        return "-"

    def known(key: str) -> str:
        value = host.get(key)
        return "unknown" if value is None or value == "" else str(value)

    return (
        f"memory pressure {known('memory_pressure')}, thermal {known('thermal_state')}, "
        f"power {known('power_source')}"
    )


def _holding_text(host: Mapping[str, Any]) -> str:
    holds = host.get("holding_back")
    if not isinstance(holds, list):
        return "-"
    if not holds:
        return "no" if host.get("guard", True) else "no (host_guard is off)"
    parts = []
    for hold in holds:
        limit = hold.get("slot_limit") if isinstance(hold, dict) else None
        reason = hold.get("reason") if isinstance(hold, dict) else hold
        slots = "paused" if limit == 0 else f"{limit} slot{'s' if limit != 1 else ''}"
        parts.append(f"{reason} ({slots})")
    return ", ".join(parts)


def _admission_rows(admission: Any) -> list[tuple[str, str]]:
    """What the coordinator's admission and routing gates see (``status.admission``)."""
    if not isinstance(admission, Mapping):
        return []
    registration = admission.get("registration") or {}
    protocol = _text(admission.get("protocol"))
    rows = [
        ("protocol", f"{protocol}, binary version {_text(admission.get('binary_version'))}"),
        ("auth state", _text(registration.get("auth_state"))),
        ("model hash", _text(admission.get("model_hash") or admission.get("model_hash_error"))),
    ]
    catalog = admission.get("catalog")
    if isinstance(catalog, Mapping):
        text = f"release {_text(catalog.get('release_id'))}, row {_text(catalog.get('row'))}"
        if catalog.get("hash_matches") is False:
            text += (
                f"; the row requires {_text(catalog.get('model_sha256'))}: connected but "
                "never routed"
            )
        rows.append(("catalog", text))
    else:
        rows.append(("catalog", _text(admission.get("catalog_error"))))
    return rows


def format_status_table(status: Mapping[str, Any], *, now: float | None = None) -> str:
    """Render a ``/status`` dict as a two-column table for ``mlx-provider status``.

    Reads these keys, showing ``-`` for any that is missing: ``connection``,
    ``state``, ``state_reason``, ``provider_id``, ``assigned_id``,
    ``coordinator_url``, ``last_heartbeat_sent_unix``, ``jobs_in_flight``
    (with ``slots_free`` and ``slots_total`` when present), ``totals``
    (``requests``, ``complete``, ``cancelled``, ``errors``, ``tokens_generated``),
    ``model`` (``id``, ``params_b``, ``loading``, ``max_context_tokens``,
    ``inter_token_latency_ms`` with ``p50``, ``p99``, ``max``, and
    ``prefill_slice`` with ``budget_ms``, ``tokens``),
    ``memory`` (``rss_bytes``; ``kv_reserved_bytes``, ``kv_budget_bytes`` and
    ``prompt_cache`` when the engine reports them), ``host`` (``chip``, ``cpu_cores``,
    ``gpu_cores``, ``memory_pressure``, ``thermal_state``, ``power_source``,
    ``cpu_pct``, ``gpu_pct``, ``guard``, ``holding_back``; its rows are left
    out when it is absent), ``reconnects``, ``uptime_s``. ``now`` (default:
    the current time) dates the heartbeat.
    """
    now = time.time() if now is None else now
    totals = status.get("totals") or {}
    model = status.get("model") or {}
    memory = status.get("memory") or {}

    heartbeat = status.get("last_heartbeat_sent_unix")
    if isinstance(heartbeat, int | float) and heartbeat > 0:
        heartbeat_text = f"{_duration(max(0.0, now - heartbeat))} ago"
    else:
        heartbeat_text = "never"

    model_text = _text(model.get("id"))
    facts = []
    if isinstance(model.get("params_b"), int | float):
        facts.append(f"{model['params_b']:g}B params")
    if model.get("max_context_tokens"):
        facts.append(f"context {model['max_context_tokens']}")
    if facts:
        model_text += f" ({', '.join(facts)})"
    if model.get("loading"):
        model_text += " [loading]"

    itl = model.get("inter_token_latency_ms") or {}
    if itl.get("samples"):
        itl_text = f"p50 {itl.get('p50')} ms, p99 {itl.get('p99')} ms, max {itl.get('max')} ms"
    else:
        itl_text = "-"
    pace = model.get("prefill_slice") or {}
    if "budget_ms" in pace:
        budget = "fixed chunks" if pace["budget_ms"] is None else f"{pace['budget_ms']} ms budget"
        slice_text = f"{_text(pace.get('tokens'))} tokens ({budget})"
    else:
        slice_text = "-"

    in_flight = _text(status.get("jobs_in_flight"))
    if status.get("slots_total"):
        in_flight += f" ({_text(status.get('slots_free'))} of {status['slots_total']} slots free)"

    requests_text = _text(totals.get("requests"))
    if totals:
        requests_text += (
            f" ({_text(totals.get('complete'))} complete, "
            f"{_text(totals.get('cancelled'))} cancelled, {_text(totals.get('errors'))} errors)"
        )

    host = status.get("host") or {}
    rows = [
        ("state", f"{_text(status.get('state'))} ({_text(status.get('connection'))})"),
        ("reason", _text(status.get("state_reason"))),
        ("provider id", _text(status.get("provider_id"))),
        ("assigned id", _text(status.get("assigned_id"))),
        ("coordinator", _text(status.get("coordinator_url"))),
        ("last heartbeat", heartbeat_text),
        ("jobs in flight", in_flight),
        ("requests", requests_text),
        ("tokens generated", _text(totals.get("tokens_generated"))),
        ("model", model_text),
        ("inter-token", itl_text),
        ("prefill slice", slice_text),
        ("memory (RSS)", _bytes(memory.get("rss_bytes"))),
        *_kv_rows(memory),
        ("reconnects", _text(status.get("reconnects"))),
        ("uptime", _duration(status.get("uptime_s"))),
    ]
    if host:
        at = next(i for i, (name, _) in enumerate(rows) if name == "reconnects")
        rows[at:at] = [
            ("chip", _chip_text(host)),
            ("host", _host_text(host)),
            ("cpu / gpu", f"{_pct(host.get('cpu_pct'))} / {_pct(host.get('gpu_pct'))}"),
            ("holding back", _holding_text(host)),
        ]
    rows += _admission_rows(status.get("admission"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
