"""Subcommands that manage the agent as a service: install, status, doctor...

:func:`register` adds them to ``mlx-provider``'s subparsers. Each handler
takes the parsed :class:`argparse.Namespace` and returns the exit code.

They read only a few keys of the config file (``coordinator_url``,
``provider_token``, ``model``, ``status_host``, ``status_port``,
``log_file``, ``drain_timeout_s``), each overridable by its
``MLX_PROVIDER_<KEY>`` environment variable like the agent's own config,
and they tolerate a missing or broken file: ``doctor`` is there to report it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from provider.coordinator.keys import DEFAULT_KEY_DIR
from provider.host import service
from provider.host.service import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_LABEL, LaunchAgent
from provider.logs import LOG_FILE_NAME, default_log_dir
from provider.ops.status_server import DEFAULT_STATUS_PORT, format_status_table

__all__ = ["register"]

DEFAULT_CONFIG_PATH = Path("~/.config/mlx-provider/config.toml")
ENV_PREFIX = "MLX_PROVIDER_"
#: Passed to the service so it finds the same Hugging Face cache as this shell.
_PASSED_ENV = ("HF_HOME", "HF_HUB_CACHE")


def config_path(arg: str | None) -> Path:
    """``--config``, else ``$MLX_PROVIDER_CONFIG``, else the default, made absolute."""
    raw = arg or os.environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH
    return Path(raw).expanduser().absolute()


def read_settings(path: Path) -> dict[str, Any]:
    """Top-level keys of the TOML file at ``path``; ``{}`` when unreadable."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def setting(settings: dict[str, Any], key: str, default: Any = None) -> Any:
    """``$MLX_PROVIDER_<KEY>`` if set, else ``settings[key]``, else ``default``."""
    env = os.environ.get(ENV_PREFIX + key.upper())
    if env:
        return env
    value = settings.get(key)
    return default if value is None else value


def _log_file(settings: dict[str, Any]) -> Path | None:
    value = setting(settings, "log_file")
    return Path(value).expanduser() if value else None


# --------------------------------------------------------------------------
# Handlers


def cmd_install(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    settings = read_settings(path)
    agent = LaunchAgent(args.label)
    # Without a log_file in the config the service logs to the rotated file
    # next to launchd's stdout/stderr, where `mlx-provider logs` looks.
    configured = _log_file(settings)
    log_file = None if configured else agent.log_dir / LOG_FILE_NAME
    return service.install(
        path,
        label=args.label,
        log_file=log_file,
        drain_timeout_s=float(setting(settings, "drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S)),
        extra_env={k: os.environ[k] for k in _PASSED_ENV if os.environ.get(k)},
        dry_run=args.dry_run,
    )


def cmd_uninstall(args: argparse.Namespace) -> int:
    return service.uninstall(label=args.label, dry_run=args.dry_run)


def cmd_start(args: argparse.Namespace) -> int:
    return service.start(label=args.label)


def cmd_stop(args: argparse.Namespace) -> int:
    return service.stop(label=args.label)


def cmd_restart(args: argparse.Namespace) -> int:
    return service.restart(label=args.label)


def cmd_logs(args: argparse.Namespace) -> int:
    settings = read_settings(config_path(args.config))
    return service.logs(
        follow=args.follow, lines=args.lines, log_file=_log_file(settings), label=args.label
    )


def cmd_status(args: argparse.Namespace) -> int:
    settings = read_settings(config_path(args.config))
    port = args.port
    if port is None:
        port = int(setting(settings, "status_port", DEFAULT_STATUS_PORT))
    if port == 0:
        print("the status endpoint is disabled (status_port = 0)", file=sys.stderr)
        return 1
    host = str(setting(settings, "status_host", "127.0.0.1"))
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/status"
    # No proxy: HTTP_PROXY in the environment must not capture a loopback request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as response:
            status = json.load(response)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            print(
                f"mlx-provider is not running (nothing listens on {host}:{port}). "
                "Start it with `mlx-provider start` (service) or `mlx-provider serve`.",
                file=sys.stderr,
            )
            refusal = _last_refusal()
            if refusal:
                print(refusal, file=sys.stderr)
        else:
            print(f"no answer from {url}: {exc.reason}", file=sys.stderr)
        return 1
    except (TimeoutError, ValueError) as exc:
        print(f"no valid answer from {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status_table(status))
    return 0


def _last_refusal() -> str | None:
    """The final refusal that stopped the agent, if it recorded one."""
    path = (DEFAULT_KEY_DIR / "last-refusal.json").expanduser()
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    text = (
        f"It stopped at {record.get('at')}: the coordinator closed with "
        f"{record.get('close_code')} ({record.get('reason')})."
    )
    return text + (f" Fix: {record['fix']}." if record.get("fix") else "")


def cmd_doctor(args: argparse.Namespace) -> int:
    # Imported here: doctor pulls in websockets, and only this command needs it.
    from provider.ops.doctor import format_results, run_checks

    path = config_path(args.config)
    settings = read_settings(path)
    log_file = _log_file(settings)
    production = {
        "protocol": setting(settings, "protocol", "v2"),
        "provider_id": setting(settings, "provider_id"),
        "referral_code": setting(settings, "referral_code"),
        "compatibility_set_id": setting(settings, "compatibility_set_id"),
        "binary_version": setting(settings, "advertised_binary_version"),
        "model_id": setting(settings, "model_id"),
        "max_concurrency": int(setting(settings, "max_concurrency", 1)),
        "catalog_feed_url": setting(settings, "catalog_feed_url"),
        "catalog_public_keys": settings.get("catalog_public_keys"),
    }
    results = asyncio.run(
        run_checks(
            coordinator_url=setting(settings, "coordinator_url"),
            token=setting(settings, "provider_token"),
            model=setting(settings, "model"),
            config_path=path,
            log_dir=log_file.parent if log_file else default_log_dir(),
            label=args.label,
            load_model=args.load,
            production=production,
        )
    )
    print(format_results(results))
    counted = [r for r in results if args.production or r.group != "production"]
    return 0 if all(r.ok for r in counted) else 1


# --------------------------------------------------------------------------
# Parsers


def _add_label(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label", default=DEFAULT_LABEL, help=f"launchd label (default: {DEFAULT_LABEL})"
    )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (default: $MLX_PROVIDER_CONFIG or {DEFAULT_CONFIG_PATH})",
    )


def register(subparsers: Any) -> None:
    """Add ``install``, ``uninstall``, ``start``, ``stop``, ``restart``, ``logs``,
    ``status`` and ``doctor`` to ``subparsers`` (from ``add_subparsers()``)."""
    p = subparsers.add_parser(
        "install",
        help="install and start the launchd service (macOS)",
        description="Write ~/Library/LaunchAgents/<label>.plist for `serve --config PATH` "
        "with this Python, then load and start it. Run again after changing the config "
        "path or upgrading: it shows what changed and reloads.",
    )
    _add_config(p)
    _add_label(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    p.set_defaults(func=cmd_install)

    p = subparsers.add_parser(
        "uninstall", help="stop the service and remove its plist (logs are kept)"
    )
    _add_label(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    p.set_defaults(func=cmd_uninstall)

    for name, func, text in [
        ("start", cmd_start, "start the installed service"),
        ("stop", cmd_stop, "drain in-flight jobs, then stop the service (SIGTERM)"),
        ("restart", cmd_restart, "restart the service now (in-flight jobs are cut off)"),
    ]:
        p = subparsers.add_parser(name, help=text)
        _add_label(p)
        p.set_defaults(func=func)

    p = subparsers.add_parser("logs", help="show the agent's logs")
    _add_config(p)
    _add_label(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="lines (default 50)")
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("status", help="show the running agent's state")
    _add_config(p)
    p.add_argument("--port", type=int, metavar="N", help="status port (default: config or 8765)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--timeout", type=float, default=3.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser(
        "doctor", help="check the machine, model, config and coordinator; say how to fix"
    )
    _add_config(p)
    _add_label(p)
    p.add_argument("--load", action="store_true", help="also load the model (slow)")
    p.add_argument(
        "--production",
        action="store_true",
        help="exit non-zero when a production admission gate would fail",
    )
    p.set_defaults(func=cmd_doctor)
