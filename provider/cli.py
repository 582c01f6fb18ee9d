"""``mlx-provider``: the command line.

``serve`` runs the agent; the flags ``--config``, ``--coordinator``,
``--token``, ``--referral-code``, ``--compatibility-set-id``, ``--protocol``,
``--provider-id``, ``--model`` and ``--max-concurrency`` are a contract other
tools rely on, and with them no config file is needed. Other
subcommands (service management, status, doctor, demo, make-test-model) are
registered by their own modules.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provider import __version__, logs
from provider.config import Config, ConfigError, ensure_provider_id, load_config
from provider.host.power import SleepAssertion, watch_for_wake
from provider.ops import demo, service_cli
from provider.ops.status_server import StatusServer
from provider.testing import model as test_model

log = logging.getLogger("mlx_provider.cli")

#: Exit code after a second SIGINT (the shell's convention for SIGINT).
EXIT_INTERRUPTED = 130


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="connect to the coordinator and serve chat completions",
        description="Connect to the coordinator and serve chat completions until drained. "
        "SIGTERM or SIGINT drains (finish in-flight jobs, then exit 0); a second SIGINT "
        "exits at once.",
    )
    p.add_argument("--config", metavar="PATH", help="TOML config file")
    p.add_argument("--coordinator", metavar="URL", help="coordinator WebSocket URL")
    p.add_argument("--token", metavar="T", help="provider token (prefer the config file)")
    p.add_argument(
        "--referral-code", metavar="C", help="referral code for a first start without a token"
    )
    p.add_argument(
        "--compatibility-set-id", metavar="ID", help="OWNER/NAME:vX.Y.Z@<commit> to register with"
    )
    p.add_argument(
        "--protocol",
        choices=["v1", "v2"],
        help="v2 (default): auth_request and the encrypted leg; v1: hello, for older coordinators",
    )
    p.add_argument("--provider-id", metavar="ID")
    p.add_argument("--model", metavar="DIR_OR_REPO", help="model directory or Hugging Face repo")
    p.add_argument("--max-concurrency", type=int, metavar="N")
    p.add_argument("--max-context-tokens", type=int, metavar="N")
    p.add_argument(
        "--prefill-slice-ms",
        type=float,
        metavar="MS",
        help="time one prefill chunk should take (default: 100, or 3 decode steps when "
        "longer; 0: fixed prefill_step_size chunks)",
    )
    p.add_argument("--status-port", type=int, metavar="N", help="local status port; 0 disables")
    p.add_argument("--drain-timeout", type=float, metavar="S")
    p.add_argument("--draft-model", metavar="DIR_OR_REPO", help="draft model for speculation")
    p.add_argument("--kv-bits", type=int, choices=[2, 3, 4, 6, 8], help="quantize KV caches")
    p.add_argument("--prompt-cache-bytes", type=int, metavar="N", help="prefix cache bound; 0: off")
    p.add_argument("--memory-budget-bytes", type=int, metavar="N", help="KV memory budget")
    p.add_argument("--prompt-lookup", choices=["auto", "on", "off"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", metavar="PATH")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-provider",
        description="Provider agent: serves a compute marketplace's chat completions with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"mlx-provider {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    for module in (service_cli, test_model, demo):
        module.register(sub)
    return parser


def serve_config(args: argparse.Namespace) -> tuple[Config, Any]:
    overrides = {
        "coordinator_url": args.coordinator,
        "provider_token": args.token,
        "referral_code": args.referral_code,
        "compatibility_set_id": args.compatibility_set_id,
        "protocol": args.protocol,
        "provider_id": args.provider_id,
        "model": args.model,
        "max_concurrency": args.max_concurrency,
        "max_context_tokens": args.max_context_tokens,
        "prefill_slice_ms": args.prefill_slice_ms,
        "status_port": args.status_port,
        "drain_timeout_s": args.drain_timeout,
        "draft_model": args.draft_model,
        "kv_bits": args.kv_bits,
        "prompt_cache_bytes": args.prompt_cache_bytes,
        "memory_budget_bytes": args.memory_budget_bytes,
        "prompt_lookup": args.prompt_lookup,
        "log_level": args.log_level,
        "log_file": args.log_file,
    }
    config, path = load_config(args.config, overrides=overrides)
    return ensure_provider_id(config, path), path


def setup_logging(config: Config) -> None:
    secrets = [config.provider_token] if config.provider_token else []
    logs.setup_logging(
        level=config.log_level,
        log_file=Path(config.log_file).expanduser() if config.log_file else None,
        json=config.log_json,
        secrets=secrets,
    )


def make_engine(config: Config) -> Any:
    from provider.engine.mlx import MlxEngine

    assert config.model is not None
    return MlxEngine(
        config.model,
        max_concurrency=config.max_concurrency,
        max_context_tokens=config.max_context_tokens,
        default_max_tokens=config.default_max_tokens,
        prefill_step_size=config.prefill_step_size,
        prefill_slice_ms=config.prefill_slice_ms,
        handoff_interval=config.chunk_interval_ms / 1000.0,
        memory_budget_bytes=config.memory_budget_bytes,
        prompt_cache_bytes=config.prompt_cache_bytes,
        prompt_cache_entries=config.prompt_cache_entries,
        max_queue_wait_s=config.request_timeout_s,
        kv_bits=config.kv_bits,
        kv_group_size=config.kv_group_size,
        quantized_kv_start=config.quantized_kv_start,
        draft_model=config.draft_model,
        num_draft_tokens=config.num_draft_tokens,
        prompt_lookup=config.prompt_lookup,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config, path = serve_config(args)
    except ConfigError as exc:
        print(f"mlx-provider: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    return asyncio.run(serve(config, path))


async def serve(config: Config, config_path: Any = None, *, engine: Any = None) -> int:
    """Run the agent with its local companions until it exits; returns the exit code."""
    from provider.agent import Agent

    hooks = None
    if config.keep_awake != "never":
        hooks = SleepAssertion(always=config.keep_awake == "always")
    agent = Agent(config, engine or make_engine(config), config_path=config_path, hooks=hooks)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signals = {"count": 0}

    def on_signal(signame: str) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("%s: draining (send SIGINT again to exit at once)", signame)
            agent.request_drain(signame)
        elif signame == "SIGINT":
            log.warning("second SIGINT: exiting now")
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    companions: list[asyncio.Task[Any]] = []
    status_server = None
    try:
        if config.status_port:
            status_server = StatusServer(
                agent.status, agent.is_healthy, host=config.status_host, port=config.status_port
            )
            try:
                await status_server.start()
            except OSError as exc:
                log.warning("status endpoint not started: %s", exc)
                status_server = None
        companions.append(asyncio.create_task(watch_for_wake(agent.wake_detected)))
        return await agent.run()
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED
    finally:
        for task in companions:
            task.cancel()
        await asyncio.gather(*companions, return_exceptions=True)
        if status_server is not None:
            await status_server.stop()
        if hooks is not None:
            hooks.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
