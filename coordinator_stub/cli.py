"""``coordinator-stub`` command line.

Starts a :class:`~coordinator_stub.app.CoordinatorStub`, prints exactly one
line ``ready ws=ws://HOST:PORT/ws/provider http=http://HOST:PORT`` on stdout
once both listeners are up, logs to stderr, and exits 0 on SIGTERM or SIGINT
after a clean shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .app import CoordinatorStub
from .catalog import CatalogError
from .config import WS_PATH, StubConfig
from .manifest import ManifestError

logger = logging.getLogger("coordinator_stub.cli")

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StubConfig) if f.init}


def _catalog_model(text: str) -> tuple[str, str]:
    model_id, sep, source = text.partition("=")
    if not sep or not model_id or not source:
        raise argparse.ArgumentTypeError(f"expected MODEL_ID=PATH_OR_SHA256, got {text!r}")
    return model_id, source


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"not a duration in seconds: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0 (use the --no-... flag to disable)")
    return value


def _timer(
    group: argparse._ArgumentGroup, flag: str, off_flag: str, *, dest: str, help: str, off_help: str
) -> None:
    """A timer option taking seconds (> 0) and its ``--no-...`` twin that turns it off."""
    group.add_argument(
        flag, dest=dest, type=_positive_seconds, default=_DEFAULTS[dest], metavar="S", help=help
    )
    group.add_argument(off_flag, dest=dest, action="store_const", const=None, help=off_help)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Defaults only for options taking a value: "--no-x (default: None)" would
    # describe the dest, not the flag.
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default in (None, []):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    parser = argparse.ArgumentParser(
        prog="coordinator-stub",
        description=(
            "Stand-in for the compute marketplace coordinator: provider WebSocket "
            f"endpoint ({WS_PATH}) with the real coordinator's timers, and an "
            "OpenAI-compatible buyer API. Prints 'ready ws=... http=...' on stdout "
            "when listening; exits 0 on SIGTERM/SIGINT. Times are in seconds."
        ),
        formatter_class=_HelpFormatter,
    )

    g = parser.add_argument_group("listeners")
    g.add_argument("--host", default=d["host"], help="interface both listeners bind")
    g.add_argument(
        "--ws-port",
        type=int,
        default=d["ws_port"],
        help=f"provider WebSocket port (path {WS_PATH}); 0 picks a free port",
    )
    g.add_argument(
        "--http-port",
        type=int,
        default=d["http_port"],
        help="buyer API port; 0 picks a free port",
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate chain: the provider endpoint then speaks TLS only (wss://)",
    )
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g = parser.add_argument_group("profile")
    g.add_argument(
        "--profile",
        choices=("dev", "production"),
        default=d["profile"],
        help="admission gates: dev is permissive; production turns on those of the shipped "
        "dist/coordinator.yaml (binary floor 1.8.33, tokens required with tokenless "
        "self-mint, referral codes for bootstrap, require_hash_verified, the encrypted leg, "
        "settlement enforce, no warm-up gate); a flag below overrides its gate",
    )

    g = parser.add_argument_group("authentication")
    g.add_argument(
        "--token",
        dest="tokens",
        action="append",
        default=[],
        metavar="T",
        help="operator provider token, valid for any provider id (repeatable); none given "
        "and tokens not required = any token accepted; a refused token is closed with 4005",
    )
    g.add_argument(
        "--issue-provider-token",
        action="store_true",
        help="put a generated assigned_provider_token in every hello_ack",
    )
    g.add_argument(
        "--require-provider-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require a bearer token even without --token (profile default)",
    )
    g.add_argument(
        "--allow-tokenless",
        dest="allow_tokenless_provisional_bootstrap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let tokenless connections self-mint a token (not routable) or run the v2 "
        "credential bootstrap (profile default)",
    )
    g.add_argument(
        "--referral-code",
        dest="referral_codes",
        action="append",
        default=[],
        metavar="CODE",
        help="referral code accepted by credential bootstrap (repeatable)",
    )
    g.add_argument(
        "--require-referral",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="credential bootstrap needs a referral code (profile default)",
    )
    g.add_argument(
        "--accept-compatibility-set",
        dest="accepted_compatibility_set_ids",
        action="append",
        default=[],
        metavar="ID",
        help="accepted compatibility_set_id (repeatable); any given makes the id required",
    )
    g.add_argument(
        "--bridge-compatibility-set",
        dest="bridge_compatibility_set_ids",
        action="append",
        default=[],
        metavar="ID",
        help="first-hop bridge compatibility_set_id: admitted without the floor, never routed",
    )

    g = parser.add_argument_group("admission")
    g.add_argument(
        "--required-binary-version",
        default=None,
        metavar="V",
        help="binary floor: a lower binary_version is closed 4004 (profile default; '' none)",
    )
    g.add_argument(
        "--recommended-binary-version",
        default=None,
        metavar="V",
        help="advisory recommended_binary_version (profile default)",
    )
    g.add_argument(
        "--catalog-model",
        dest="catalog_models",
        action="append",
        type=_catalog_model,
        default=[],
        metavar="MODEL_ID=PATH",
        help="a row of the signed autotune catalog the stub serves at /v1/autotune-candidates: "
        "the model id and its snapshot directory, .gguf file or sha256 (repeatable)",
    )
    g.add_argument(
        "--catalog-key-file",
        default=None,
        metavar="FILE",
        help="Ed25519 seed (32 bytes raw or base64) signing the catalog; default: a key "
        "generated at start (its id and public key are logged)",
    )
    g.add_argument(
        "--catalog-key-id",
        default=d["catalog_key_id"],
        metavar="ID",
        help="key id of the catalog signature",
    )
    g.add_argument(
        "--require-hash-verified",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="route only providers whose model hash matches their catalog row (profile default)",
    )
    g.add_argument(
        "--require-encrypted-leg",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse v1 hello (4013) and route only tier-2 sessions (profile default)",
    )
    g.add_argument(
        "--rekey-after-requests",
        type=int,
        default=d["rekey_after_requests"],
        metavar="N",
        help="requests per tier-2 key epoch before a rekey",
    )
    g.add_argument(
        "--rekey-after-seconds",
        type=_positive_seconds,
        default=d["rekey_after_seconds"],
        metavar="S",
        help="age of a tier-2 key epoch before a rekey",
    )
    g.add_argument(
        "--settlement-mode",
        choices=("off", "observe", "enforce"),
        default=None,
        help="settlement metadata and receipt verification (profile default)",
    )
    g.add_argument(
        "--pending-deadline-seconds",
        type=int,
        default=d["pending_deadline_seconds"],
        metavar="N",
        help="receipt deadline after the terminal state (1..900)",
    )

    g = parser.add_argument_group("handshake")
    g.add_argument(
        "--hello-timeout",
        dest="hello_timeout_s",
        type=_positive_seconds,
        default=d["hello_timeout_s"],
        metavar="S",
        help="close 4000 when no hello arrives within S",
    )
    g.add_argument(
        "--heartbeat-interval",
        dest="heartbeat_interval_s",
        type=int,
        default=d["heartbeat_interval_s"],
        metavar="N",
        help="hello_ack.heartbeat_interval_s (integer seconds, 1..3600)",
    )
    g.add_argument("--tier", default=d["tier"], help="hello_ack.tier")

    g = parser.add_argument_group("warm-up and wake")
    g.add_argument(
        "--warmup-gate",
        dest="warmup_gate",
        action="store_const",
        const=True,
        default=None,
        help="hold new providers degraded until the stub's 2-token warm-up request passes "
        "(profile default: on in dev, off in production)",
    )
    g.add_argument(
        "--no-warmup-gate",
        dest="warmup_gate",
        action="store_const",
        const=False,
        help="mark new providers ready without the stub's 2-token warm-up request",
    )
    g.add_argument(
        "--warmup-timeout",
        dest="warmup_timeout_s",
        type=_positive_seconds,
        default=d["warmup_timeout_s"],
        metavar="S",
        help="cancel (reason timeout) and retry a warm-up request unanswered after S",
    )
    g.add_argument(
        "--warmup-retry",
        dest="warmup_retry_s",
        type=_seconds,
        default=d["warmup_retry_s"],
        metavar="S",
        help="pause between failed warm-ups",
    )
    _timer(
        g,
        "--wake-gap",
        "--no-wake-gap",
        dest="wake_gap_s",
        help="send warm_up when heartbeats resume after a gap longer than S",
        off_help="never send warm_up on a heartbeat gap",
    )

    g = parser.add_argument_group("hostile timers (the real coordinator's)")
    _timer(
        g,
        "--write-deadline",
        "--no-write-deadline",
        dest="write_deadline_s",
        help="a text frame written by the stub arms a deadline of now+S, never cleared; "
        "a client PING after it drops the session (cause write_deadline_pong)",
        off_help="answer client PINGs normally whatever the write idleness",
    )
    _timer(
        g,
        "--inactivity",
        "--no-inactivity",
        dest="inactivity_s",
        help="drop a provider with no well-formed text frame for S (cause inactivity); "
        "binary and control frames do not count",
        off_help="never drop for inactivity",
    )
    g.add_argument(
        "--grace",
        dest="grace_s",
        type=_seconds,
        default=d["grace_s"],
        metavar="S",
        help="after a drop keep the provider unavailable for S, then remove it",
    )
    _timer(
        g,
        "--probe-timeout",
        "--no-probe",
        dest="probe_timeout_s",
        help="bound on writing each routed inference_request; exceeding it drops the "
        "session (cause probe_failed)",
        off_help="do not bound inference_request writes",
    )

    g = parser.add_argument_group("limits and sockets")
    g.add_argument(
        "--max-frame-bytes",
        type=int,
        default=d["max_frame_bytes"],
        metavar="N",
        help="largest provider frame; larger ones close the connection with 1009",
    )
    g.add_argument(
        "--so-rcvbuf",
        type=int,
        default=d["so_rcvbuf"],
        metavar="N",
        help="SO_RCVBUF of accepted provider sockets, small so a stalled stub pushes back "
        "quickly (unset: OS default)",
    )
    g.add_argument(
        "--so-sndbuf",
        type=int,
        default=d["so_sndbuf"],
        metavar="N",
        help="SO_SNDBUF of accepted provider sockets, small so a provider that stops "
        "reading fails the write probe quickly (unset: OS default)",
    )
    g.add_argument(
        "--close-timeout",
        dest="close_timeout_s",
        type=_positive_seconds,
        default=d["close_timeout_s"],
        metavar="S",
        help="how long a closing handshake may take",
    )
    g.add_argument(
        "--frame-log-size",
        type=int,
        default=d["frame_log_size"],
        metavar="N",
        help="frames remembered per provider and direction",
    )

    g = parser.add_argument_group("buyer API")
    _timer(
        g,
        "--keepalive",
        "--no-keepalive",
        dest="keepalive_s",
        help="': keepalive' SSE comment every S on streaming responses (never on "
        "non-streaming ones); the first one commits 200",
        off_help="no keepalive comments",
    )
    g.add_argument(
        "--request-timeout",
        dest="request_timeout_s",
        type=_positive_seconds,
        default=d["request_timeout_s"],
        metavar="S",
        help="buyer request deadline: cancel_request (reason timeout) and 504",
    )
    g.add_argument(
        "--cancel-grace",
        dest="cancel_grace_s",
        type=_seconds,
        default=d["cancel_grace_s"],
        metavar="S",
        help="how long a cancelled request keeps its slot waiting for the end frame",
    )
    g.add_argument(
        "--events-queue",
        dest="events_queue_size",
        type=int,
        default=d["events_queue_size"],
        metavar="N",
        help="bound of each /v1/events subscriber queue (a full one loses events)",
    )

    g = parser.add_argument_group("faults (from start-up)")
    g.add_argument(
        "--delay-frames",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="delay every frame sent to providers by S",
    )
    g.add_argument(
        "--duplicate-frames",
        action="store_true",
        help="send every frame to providers twice",
    )
    g.add_argument(
        "--refuse-connections",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="refuse provider connections for the first S",
    )
    g.add_argument(
        "--refuse-mode",
        choices=("http_503", "unlisten"),
        default="http_503",
        help="how to refuse: HTTP 503 on the upgrade, or close the listening socket",
    )
    g.add_argument(
        "--accept-then-close",
        type=int,
        default=0,
        metavar="N",
        help="accept then immediately close the next N WebSockets (-1: all)",
    )

    g = parser.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="stderr log level",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> StubConfig:
    """The :class:`StubConfig` the parsed ``args`` describe."""
    names = {f.name for f in dataclasses.fields(StubConfig) if f.init}
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    return StubConfig(**values)


async def run(config: StubConfig, args: argparse.Namespace) -> int:
    stub = CoordinatorStub(config)
    await stub.start()
    try:
        if args.delay_frames:
            stub.delay_frames(args.delay_frames)
        if args.duplicate_frames:
            stub.duplicate_frames(True)
        if args.refuse_connections:
            stub.refuse_connections(args.refuse_connections, mode=args.refuse_mode)
        if args.accept_then_close:
            stub.accept_then_close(True if args.accept_then_close < 0 else args.accept_then_close)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        logger.info(
            "autotune catalog url=%s key_id=%s public_key=%s rows=%d",
            stub.catalog_url,
            stub.catalog_key_id,
            stub.catalog_public_key,
            0 if stub.catalog is None else len(stub.catalog.feed.rows),
        )
        print(f"ready ws={stub.ws_url} http={stub.http_url}", flush=True)
        await stop.wait()
        logger.info("signal received, shutting down")
    finally:
        await stub.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``coordinator-stub``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = config_from_args(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(run(config, args))
    except (OSError, CatalogError, ManifestError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
