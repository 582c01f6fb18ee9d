"""``mlx-provider doctor``: check everything the agent needs, say how to fix what is wrong.

:func:`run_checks` runs every check and returns one :class:`CheckResult`
each; :func:`format_results` renders them. The checks take plain values
(the coordinator URL, token, model...), not the config object, so they also
diagnose a config that does not load.

The provider token is never part of a result: it is only sent, as
``Authorization: Bearer``, in the WebSocket handshake with the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import platform as _platform
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close

from provider import __version__
from provider.config import ConfigError, check_provider_token, model_id_from
from provider.coordinator.admission import (
    BOOTSTRAP_PROVIDER_ID,
    MAX_CONCURRENCY_CEILING,
    PRODUCTION_REQUIRED_BINARY_VERSION,
    compatibility_set_problem,
    provider_id_problem,
    required_version_from_reason,
    version_problem,
)
from provider.coordinator.catalog import (
    PRODUCTION_PUBLIC_KEYS,
    CatalogAdmission,
    CatalogError,
    default_feed_url,
    fetch_admission,
)
from provider.coordinator.keys import DEFAULT_KEY_DIR, KeyFileError, KeyStore, b64
from provider.coordinator.messages import (
    MAX_FRAME_BYTES,
    AuthChallenge,
    AuthRequestInitial,
    AuthResponse,
    Tier2Capabilities,
    decode_coordinator_frame,
    encode_text,
)
from provider.coordinator.reconnect import CLOSE_REASONS, close_policy
from provider.coordinator.session import NoRedirectConnect, tls_failure
from provider.coordinator.tier2 import b64url, generate_key, public_bytes
from provider.host.hardware import total_ram_gb
from provider.host.model_identity import ModelIdentity, ModelIdentityError, model_identity
from provider.host.service import DEFAULT_LABEL, LaunchAgent, host_platform, service_state
from provider.logs import default_log_dir

__all__ = [
    "CheckResult",
    "check_config_file",
    "check_coordinator",
    "check_hardware",
    "check_log_dir",
    "check_memory",
    "check_mlx",
    "check_model",
    "check_production_gates",
    "check_python",
    "check_service",
    "check_token",
    "format_results",
    "run_checks",
    "total_memory_bytes",
]

#: Share of RAM the weights may take: macOS lets the GPU wire about 2/3 to 3/4.
MAX_WEIGHTS_SHARE = 0.75
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, whether it passed, what was found, and the fix.

    ``fix`` is set when ``ok`` is false. A check that does not apply here
    (launchd on Linux) has ``ok`` true and ``skipped`` true.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    skipped: bool = False
    #: ``production`` for the admission gates of a production coordinator.
    group: str = ""


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _sysctl(name: str) -> str | None:
    exe = shutil.which("sysctl") or "/usr/sbin/sysctl"
    try:
        proc = subprocess.run([exe, "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


# --------------------------------------------------------------------------
# Machine


def check_python() -> CheckResult:
    """Report the interpreter and the OS."""
    # Always passes: the package cannot be installed on an older Python.
    version = _platform.python_version()
    where = f"{_platform.python_implementation()} {version} ({sys.executable}) on "
    where += f"{_platform.system()} {_platform.release()} {_platform.machine()}"
    return CheckResult("python", True, where)


def check_hardware(*, platform: str | None = None, machine: str | None = None) -> CheckResult:
    """Apple Silicon on macOS (``arm64``, and not an x86_64 Python under Rosetta)."""
    platform = host_platform(platform)
    machine = machine or _platform.machine()
    if platform != "darwin":
        return CheckResult(
            "apple silicon",
            True,
            f"{platform} {machine}: MLX runs on the CPU only (development use)",
            skipped=True,
        )
    if machine == "arm64":
        return CheckResult("apple silicon", True, "arm64")
    if _sysctl("sysctl.proc_translated") == "1":
        return CheckResult(
            "apple silicon",
            False,
            f"this Python is {machine}, running under Rosetta on Apple Silicon",
            "install an arm64 Python (python.org universal installer, or Homebrew in "
            "/opt/homebrew) and reinstall mlx-provider with it",
        )
    return CheckResult(
        "apple silicon", False, f"{machine} Mac", "MLX needs an Apple Silicon (M-series) Mac"
    )


def total_memory_bytes(*, platform: str | None = None) -> int | None:
    """Physical memory: ``sysctl hw.memsize`` on macOS, ``/proc/meminfo`` on Linux."""
    if host_platform(platform) == "darwin":
        value = _sysctl("hw.memsize")
        return int(value) if value and value.isdigit() else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(*, platform: str | None = None) -> CheckResult:
    """Total memory can be read (the model check compares the weights with it)."""
    total = total_memory_bytes(platform=platform)
    if total is None:
        return CheckResult(
            "memory", False, "could not read the total memory", "check that sysctl runs"
        )
    return CheckResult("memory", True, f"{_gib(total)} total")


def check_mlx(*, platform: str | None = None) -> CheckResult:
    """``mlx.core`` imports and has a default device (the GPU on macOS)."""
    platform = host_platform(platform)
    try:
        # Imported here: slow, and absent on some hosts.
        import mlx.core as mx
    except Exception as exc:
        package = "mlx" if platform == "darwin" else "'mlx[cpu]'"
        return CheckResult("mlx", False, f"cannot import mlx.core: {exc}", f"pip install {package}")
    device = mx.default_device()
    detail = f"mlx {getattr(mx, '__version__', '?')}, default device {device}"
    if platform == "darwin" and device != mx.gpu:
        return CheckResult(
            "mlx",
            False,
            detail,
            "MLX did not find the Metal GPU; it needs an Apple Silicon Mac with macOS 13.5+",
        )
    return CheckResult("mlx", True, detail)


# --------------------------------------------------------------------------
# Model


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def _cached_snapshot(repo_id: str) -> Path | None:
    repo_dir = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def _missing_model_files(model_dir: Path) -> list[str]:
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    return missing


def _load(model_dir: Path) -> float:
    from mlx_lm import load  # imports transformers: seconds

    started = time.monotonic()
    load(str(model_dir))
    return time.monotonic() - started


def check_model(
    model: str | None,
    *,
    load: bool = False,
    memory_bytes: int | None = None,
    config_path: Path | None = None,
) -> CheckResult:
    """The model is a complete local directory, or a repo id in the Hugging Face cache.

    Complete means ``config.json``, ``*.safetensors`` weights and a tokenizer
    (``tokenizer.json`` or ``tokenizer.model``). With ``memory_bytes``, the
    weights must fit in :data:`MAX_WEIGHTS_SHARE` of it. With ``load``, the
    model is also loaded with ``mlx_lm.load``, which blocks as long as the
    agent's start does.
    """
    where = f" in {config_path}" if config_path else ""
    if not model:
        return CheckResult(
            "model",
            False,
            "no model configured",
            f"set model{where} to a local model directory or a Hugging Face repo id",
        )
    local = Path(model).expanduser()
    if local.exists() or not _REPO_ID.match(model):
        if not local.is_dir():
            return CheckResult(
                "model",
                False,
                f"model directory {local} does not exist",
                f"download the model there, or set model{where} to the right directory",
            )
        model_dir, source = local, str(local)
        download = f"download the complete model into {local}"
    else:
        snapshot = _cached_snapshot(model)
        if snapshot is None:
            return CheckResult(
                "model",
                False,
                f"{model} is not in the Hugging Face cache ({hf_hub_cache()})",
                f"download it first: hf download {model}",
            )
        model_dir, source = snapshot, f"{model} (cached at {snapshot})"
        download = f"download it again: hf download {model}"
    missing = _missing_model_files(model_dir)
    if missing:
        return CheckResult("model", False, f"{source} lacks {', '.join(missing)}", download)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    detail = f"{source}, {_gib(weights)} of weights"
    if memory_bytes and weights > MAX_WEIGHTS_SHARE * memory_bytes:
        return CheckResult(
            "model",
            False,
            f"{detail}: more than {MAX_WEIGHTS_SHARE:.0%} of {_gib(memory_bytes)} memory",
            "use a smaller or more quantized model (e.g. a 4-bit mlx-community build)",
        )
    if load:
        try:
            seconds = _load(model_dir)
        except Exception as exc:
            return CheckResult(
                "model",
                False,
                f"{detail}; mlx_lm.load failed: {type(exc).__name__}: {exc}",
                "check that the model is an MLX-compatible architecture and upgrade mlx-lm",
            )
        detail += f", loads in {seconds:.1f} s"
    return CheckResult("model", True, detail)


# --------------------------------------------------------------------------
# Configuration


def check_config_file(config_path: Path) -> CheckResult:
    """The config file exists, is valid TOML, and is private if it holds the token."""
    if not config_path.is_file():
        return CheckResult(
            "config file",
            False,
            f"{config_path} does not exist",
            f"create {config_path} with coordinator_url, provider_token and model, "
            "or pass --config PATH",
        )
    try:
        data = tomllib.loads(config_path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return CheckResult(
            "config file", False, f"{config_path}: not valid TOML: {exc}", "fix its syntax"
        )
    except OSError as exc:
        return CheckResult(
            "config file",
            False,
            f"cannot read {config_path}: {exc.strerror}",
            f"make it readable by you: chmod 600 {config_path}",
        )
    mode = stat.S_IMODE(config_path.stat().st_mode)
    if "provider_token" in data and mode & 0o077:
        return CheckResult(
            "config file",
            False,
            f"{config_path} holds provider_token but has mode {mode:04o} (readable by others)",
            f"chmod 600 {config_path}",
        )
    return CheckResult("config file", True, f"{config_path} (mode {mode:04o})")


def check_token(
    token: str | None, *, config_path: Path | None = None, protocol: str = "v1"
) -> CheckResult:
    """A provider token is configured (v2 can start without one). Says how long
    it is, never what it is."""
    if not token:
        where = f" in {config_path}" if config_path else " in the config file"
        if protocol == "v2":
            return CheckResult(
                "provider token",
                True,
                "none yet: the first v2 connection gets one (credential bootstrap or self-mint)",
            )
        return CheckResult(
            "provider token",
            False,
            "no provider token",
            f"set provider_token{where} (or MLX_PROVIDER_PROVIDER_TOKEN)",
        )
    try:
        check_provider_token(token)
    except ConfigError as exc:
        where = f" in {config_path}" if config_path else ""
        return CheckResult("provider token", False, str(exc), f"fix provider_token{where}")
    return CheckResult("provider token", True, f"set ({len(token)} characters)")


# --------------------------------------------------------------------------
# Coordinator


async def _tcp_check(host: str, port: int, timeout: float) -> CheckResult:
    name = "coordinator tcp"
    fix = "check coordinator_url, your network and firewall; is the coordinator up?"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return CheckResult(name, False, f"{host}:{port}: no answer within {timeout:g} s", fix)
    except socket.gaierror as exc:
        return CheckResult(
            name,
            False,
            f"cannot resolve {host}: {exc.strerror}",
            "check the host name in coordinator_url and your DNS",
        )
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return CheckResult(name, False, f"cannot connect to {host}:{port}: {reason}", fix)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return CheckResult(name, True, f"{host}:{port} accepts connections")


async def _websocket_check(url: str, token: str, timeout: float, settle: float) -> CheckResult:
    name = "coordinator websocket"
    token_fix = "check provider_token; ask the marketplace for a new token if it was revoked"
    try:
        async with NoRedirectConnect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            proxy=None,
            open_timeout=timeout,
            ping_interval=None,
            close_timeout=timeout,
        ) as ws:
            # A coordinator that refuses the token after the upgrade closes at
            # once; one that accepts it waits for our hello.
            closed = await _closed_within(ws, settle)
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            detail, fix = f"HTTP {status}: the coordinator refused the token", token_fix
        elif status == 404:
            detail = "HTTP 404: no WebSocket endpoint at this path"
            fix = "check the path in coordinator_url"
        else:
            detail, fix = f"HTTP {status} instead of 101", "retry later; the coordinator is unwell"
        return CheckResult(name, False, detail, fix)
    except ssl.SSLError as exc:
        host = urllib.parse.urlsplit(url).hostname or "?"
        fix = "check coordinator_url; if the marketplace's certificate is at fault, tell them"
        if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in (2, 19, 20, 21):
            fix = "install root certificates (python.org Python: 'Install Certificates.command')"
        return CheckResult(name, False, tls_failure(exc, host), fix)
    except (InvalidURI, InvalidHandshake, OSError, TimeoutError) as exc:
        return CheckResult(
            name,
            False,
            f"handshake failed: {type(exc).__name__}: {exc}",
            "check coordinator_url (wss://HOST/PATH) and that it is the provider endpoint",
        )
    if closed is not None:
        code = closed.code
        reason = f" ({closed.reason})" if closed.reason else ""
        auth_codes = (1008, 4001, 4003, 4005, 4401, 4403)
        fix = close_policy(code, closed.reason).fix
        return CheckResult(
            name,
            False,
            f"handshake accepted, then closed by the coordinator: code {code}{reason}",
            fix or (token_fix if code in auth_codes else "see the close code; retry later"),
        )
    return CheckResult(name, True, "handshake accepted (HTTP 101) with the provider token")


async def _closed_within(ws: ClientConnection, seconds: float) -> Close | None:
    """The close frame if the peer closes within ``seconds``; None otherwise."""
    if seconds <= 0:
        return None
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return None
    except ConnectionClosed as exc:
        return exc.rcvd or Close(1006, "")
    return None  # it sent a message: it is talking to us


async def check_coordinator(
    url: str | None,
    token: str | None,
    *,
    timeout: float = 5.0,
    settle: float = 1.0,
) -> list[CheckResult]:
    """Two results: a TCP connection to the coordinator, then a WebSocket handshake.

    The handshake sends ``Authorization: Bearer <token>`` and reports the
    HTTP status when refused; once accepted, it waits up to ``settle``
    seconds for the coordinator to close (reporting the close code) before
    closing itself. It is skipped when TCP fails or there is no token.
    Each step gives up after ``timeout`` seconds. No proxy is used.
    """
    if not url:
        fix = 'set coordinator_url = "wss://HOST/PATH" in the config file'
        return [CheckResult("coordinator tcp", False, "no coordinator_url", fix)]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return [
            CheckResult(
                "coordinator tcp",
                False,
                f"coordinator_url {url!r} is not a ws:// or wss:// URL",
                'set coordinator_url = "wss://HOST/PATH"',
            )
        ]
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    tcp = await _tcp_check(parts.hostname, port, timeout)
    if not tcp.ok:
        ws = CheckResult("coordinator websocket", True, "skipped: no TCP connection", skipped=True)
    elif not token:
        ws = CheckResult("coordinator websocket", True, "skipped: no token", skipped=True)
    else:
        ws = await _websocket_check(url, token, timeout, settle)
        # Belt and braces: an exception text could echo a header.
        ws = CheckResult(ws.name, ws.ok, ws.detail.replace(token, "***"), ws.fix, ws.skipped)
    return [tcp, ws]


# --------------------------------------------------------------------------
# Production admission: what a coordinator like the production one checks


def _gate(name: str, problem: str | None, ok_detail: str, fix: str) -> CheckResult:
    if problem:
        return CheckResult(name, False, problem, fix, group="production")
    return CheckResult(name, True, ok_detail, group="production")


def _last_refusal(key_dir: Path) -> CheckResult:
    name = "last refusal"
    try:
        record = json.loads((key_dir / "last-refusal.json").read_text())
    except (OSError, ValueError):
        return CheckResult(name, True, "none recorded")
    reason = str(record.get("reason") or "")
    detail = f"closed {record.get('close_code')} at {record.get('at')}: {reason}"
    required = required_version_from_reason(reason)
    fix = record.get("fix") or "see the reason"
    if required:
        fix = (
            f"the coordinator requires binary version {required}: upgrade mlx-provider, or set "
            f"advertised_binary_version to {required} or later; then restart"
        )
    return CheckResult(name, False, detail, fix)


async def check_production_gates(
    *,
    protocol: str = "v2",
    coordinator_url: str | None,
    token: str | None,
    provider_id: str | None,
    referral_code: str | None = None,
    compatibility_set_id: str | None = None,
    binary_version: str | None = None,
    model: str | None,
    model_id: str | None = None,
    max_concurrency: int = 1,
    catalog_feed_url: str | None = None,
    catalog_public_keys: dict[str, str] | None = None,
    key_dir: Path | None = None,
    timeout: float = 10.0,
) -> list[CheckResult]:
    """One result per gate of a production coordinator (``dist/coordinator.yaml``):
    the encrypted leg, the binary floor, credentials, the compatibility set, the
    provider id, the model's identity hash and its catalog row, the concurrency
    ceiling, and the last final refusal this provider received."""
    key_dir = (key_dir or DEFAULT_KEY_DIR).expanduser()
    version = binary_version or __version__
    results = [
        _gate(
            "protocol",
            None
            if protocol == "v2"
            else "protocol v1: a production coordinator requires the "
            "encrypted leg and closes a v1 hello with 4013",
            "v2 (auth_request, encrypted leg, receipts)",
            'set protocol = "v2"',
        ),
        _gate(
            "binary version",
            version_problem(version, PRODUCTION_REQUIRED_BINARY_VERSION),
            f"{version} (production floor {PRODUCTION_REQUIRED_BINARY_VERSION})",
            f"set advertised_binary_version to {PRODUCTION_REQUIRED_BINARY_VERSION} or later "
            "(the version of the protocol this build speaks), or upgrade; 4004 otherwise",
        ),
    ]
    if token:
        results.append(CheckResult("credentials", True, "provider token set (Bearer)"))
    elif provider_id is None or BOOTSTRAP_PROVIDER_ID.fullmatch(provider_id):
        results.append(
            _gate(
                "credentials",
                None
                if referral_code
                else "no token and no referral_code: the credential "
                "bootstrap is refused with 4005 referral_required",
                "no token: the first start bootstraps one with referral_code",
                "set referral_code (from the marketplace), or provider_token",
            )
        )
    else:
        results.append(
            CheckResult(
                "credentials",
                True,
                f"no token: {provider_id!r} self-mints one on first connect (that session is "
                "not routed; the agent reconnects with the token at once)",
            )
        )
    results.append(
        _gate(
            "compatibility set",
            (
                compatibility_set_problem(compatibility_set_id)
                if compatibility_set_id
                else "no compatibility_set_id: a coordinator with a compatibility policy refuses "
                "(4001 compatibility_set_required) or never routes"
            ),
            compatibility_set_id or "",
            "set compatibility_set_id to the id the marketplace publishes for this release",
        )
    )
    results.append(
        _gate(
            "provider id",
            provider_id_problem(provider_id) if provider_id else None,
            provider_id or "not set: one is generated (mp-<32 hex>) on first start",
            "use 1 to 64 letters, digits, '_', '.' or '-'",
        )
    )
    results.append(
        CheckResult(
            "max concurrency",
            True,
            f"{max_concurrency}"
            + (
                f": above the coordinator's ceiling, it routes at most {MAX_CONCURRENCY_CEILING}"
                if max_concurrency > MAX_CONCURRENCY_CEILING
                else ""
            ),
        )
    )
    identity = None
    try:
        identity = await asyncio.to_thread(model_identity, model or "", cache_dir=key_dir)
        results.append(
            CheckResult("model identity", True, f"{identity.hash} ({identity.algorithm})")
        )
    except (ModelIdentityError, OSError) as exc:
        results.append(
            CheckResult(
                "model identity",
                False,
                f"{exc}",
                "a production coordinator routes only models whose hash matches the catalog; "
                "serve a real copy of the published snapshot",
            )
        )
    served = model_id or await asyncio.to_thread(model_id_from, model or "")
    gate, catalog = await _catalog_gate(
        coordinator_url, catalog_feed_url, catalog_public_keys, served, identity, timeout
    )
    results.append(gate)
    if protocol == "v2":
        results.append(
            await probe_admission(
                coordinator_url,
                token,
                provider_id=provider_id,
                binary_version=version,
                model_id=served,
                max_concurrency=max_concurrency,
                identity=identity,
                catalog=catalog,
                compatibility_set_id=compatibility_set_id,
                referral_code=referral_code,
                key_dir=key_dir,
                timeout=timeout,
            )
        )
    results.append(_last_refusal(key_dir))
    return [dataclasses.replace(r, group="production") for r in results]


async def probe_admission(
    url: str | None,
    token: str | None,
    *,
    provider_id: str | None,
    binary_version: str,
    model_id: str,
    max_concurrency: int = 1,
    identity: ModelIdentity | None = None,
    catalog: CatalogAdmission | None = None,
    compatibility_set_id: str | None = None,
    referral_code: str | None = None,
    key_dir: Path | None = None,
    timeout: float = 10.0,
) -> CheckResult:
    """Ask the coordinator itself: the first half of a v2 registration.

    Sends the ``auth_request`` (initial) the agent would send (the token,
    binary version, compatibility set, model hash, catalog fields, receipt
    key) and reads the answer. The coordinator checks its admission gates
    there: an ``auth_challenge`` means they passed; a refusal is reported with
    its close code, reason and the fix. The challenge is never answered, so
    nothing registers and no token is minted. Not run for a credential
    bootstrap (a first start without a token), whose attempts the
    coordinator rate-limits per provider id.
    """
    name = "admission probe"
    if not url:
        return CheckResult(name, True, "skipped: no coordinator_url", skipped=True)
    pid = provider_id or ""
    if not token and (not pid or BOOTSTRAP_PROVIDER_ID.fullmatch(pid)):
        return CheckResult(
            name,
            True,
            "skipped: no token yet (the first start bootstraps one; the coordinator "
            "rate-limits bootstrap attempts)",
            skipped=True,
        )
    try:
        receipt_public = KeyStore(key_dir).receipt_public()
    except (KeyFileError, OSError) as exc:
        return CheckResult(name, False, f"no receipt key: {exc}", "see the key file's error")
    fields: dict[str, Any] = {}
    if identity is not None:
        fields |= {"model_hash": identity.hash, "model_hash_algorithm": identity.algorithm}
    if catalog is not None:
        fields |= catalog.fields()
    if compatibility_set_id:
        fields["compatibility_set_id"] = compatibility_set_id
    if referral_code:
        fields["referral_code"] = referral_code
    try:
        initial = AuthRequestInitial(
            provider_id=pid,
            hostname=socket.gethostname().encode()[:253].decode(errors="ignore") or "localhost",
            model_id=model_id,
            model_params_b=0.0,  # as while the model loads: not known before it is
            ram_gb=total_ram_gb(),
            max_context_tokens=0,
            max_concurrency=max(1, max_concurrency),
            throughput_tps_estimate=0.0,
            binary_version=binary_version,
            provider_ecdh_public_key=b64url(public_bytes(generate_key())),
            tier2_capabilities=Tier2Capabilities(),
            provider_receipt_public_key=b64(receipt_public),
            supported_models=[model_id],
            **fields,
        )
    except (ValueError, TypeError) as exc:
        return CheckResult(name, False, f"cannot build the registration: {exc}", "fix the config")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    refusal = ""
    code: int | None = None
    reason = ""
    try:
        async with NoRedirectConnect(
            url,
            additional_headers=headers,
            proxy=None,
            open_timeout=timeout,
            ping_interval=None,
            close_timeout=timeout,
            compression=None,
            max_size=MAX_FRAME_BYTES,
        ) as ws:
            try:
                await ws.send(encode_text(initial))
                answer = decode_coordinator_frame(await asyncio.wait_for(ws.recv(), timeout))
                if isinstance(answer, AuthChallenge):
                    return CheckResult(
                        name,
                        True,
                        "the coordinator admits this registration (it sent its challenge; "
                        "not answered: nothing registered)",
                    )
                if isinstance(answer, AuthResponse) and answer.error is not None:
                    refusal = f"auth_response rejected {answer.error.code}"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.wait_closed(), timeout)
            except ConnectionClosed:
                pass
            code, reason = ws.close_code, ws.close_reason or ""
    except (InvalidStatus, InvalidHandshake, ssl.SSLError, OSError, TimeoutError) as exc:
        return CheckResult(
            name, True, f"skipped: the coordinator is not reachable ({exc})", skipped=True
        )
    what = CLOSE_REASONS.get(code or 0, "closed")
    detail = f"refused: close {code} ({what}) {reason}".rstrip()
    if refusal:
        detail += f"; {refusal}"
    if token:
        detail = detail.replace(token, "***")
    return CheckResult(name, False, detail, close_policy(code, reason).fix or "see the reason")


async def _catalog_gate(
    coordinator_url: str | None,
    feed_url: str | None,
    public_keys: dict[str, str] | None,
    served: str,
    identity: Any,
    timeout: float,
) -> tuple[CheckResult, CatalogAdmission | None]:
    """The catalog gate, and the admission fields the feed gives (None: none)."""
    name = "catalog"
    if feed_url == "off":
        return CheckResult(name, False, "catalog_feed_url is off: no catalog_* fields are sent "
                           "(catalog mode legacy, never routed)",
                           "remove catalog_feed_url = \"off\""), None  # fmt: skip
    if not coordinator_url and not feed_url:
        return CheckResult(name, True, "skipped: no coordinator_url", skipped=True), None
    url = feed_url or default_feed_url(coordinator_url or "")
    try:
        admission = await fetch_admission(
            url, served, public_keys or PRODUCTION_PUBLIC_KEYS, timeout=timeout
        )
    except CatalogError as exc:
        return CheckResult(
            name,
            False,
            str(exc),
            "check catalog_feed_url and catalog_public_keys; set model_id to the catalogued "
            "Hugging Face id of this model",
        ), None
    detail = f"release {admission.release_id}, row {admission.row_key}"
    if admission.model_sha256 and identity is not None and admission.model_sha256 != identity.hash:
        return CheckResult(
            name,
            False,
            f"{detail}: the row's model_sha256 {admission.model_sha256} differs from this "
            f"model's {identity.hash}: connected but never routed",
            "serve exactly the published snapshot of this model (all files, as published)",
        ), admission
    return CheckResult(name, True, detail), admission


# --------------------------------------------------------------------------
# Service and logs


def check_service(
    *,
    label: str = DEFAULT_LABEL,
    uid: int | None = None,
    config_path: Path | None = None,
    platform: str | None = None,
) -> CheckResult:
    """The LaunchAgent is loaded and running (``launchctl print``). macOS only."""
    platform = host_platform(platform)
    name = "launchd service"
    if platform != "darwin":
        return CheckResult(
            name,
            True,
            f"skipped on {platform}; see deploy/mlx-provider.service for systemd",
            skipped=True,
        )
    if shutil.which("launchctl") is None:
        return CheckResult(name, False, "launchctl not found on PATH", "add /bin to PATH")
    state = service_state(LaunchAgent(label, uid=uid))
    install = "mlx-provider install" + (f" --config {config_path}" if config_path else "")
    if state is None:
        return CheckResult(name, False, f"{label} is not loaded", install)
    if state.state == "running":
        return CheckResult(name, True, f"{label} running (pid {state.pid})")
    exit_code = state.last_exit_code or "(never exited)"
    detail = f"{label} loaded, {state.state}, last exit code {exit_code}"
    if exit_code in ("0", "(never exited)"):
        return CheckResult(name, True, detail + "; start it with mlx-provider start")
    return CheckResult(
        name, False, detail, "see why with `mlx-provider logs`, then `mlx-provider start`"
    )


def check_log_dir(log_dir: Path) -> CheckResult:
    """The log directory exists and is writable, or could be created."""
    existing = log_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return CheckResult(
            "log directory",
            False,
            f"{existing} is not a directory, so {log_dir} cannot be created",
            f"remove or rename {existing}, or set log_file elsewhere",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return CheckResult(
            "log directory",
            False,
            f"{existing} is not writable by you",
            f"chown -R $(id -un) {existing}",
        )
    detail = str(log_dir) if existing == log_dir else f"{log_dir} (will be created)"
    return CheckResult("log directory", True, detail)


# --------------------------------------------------------------------------


async def run_checks(
    *,
    # What the agent uses.
    coordinator_url: str | None,
    token: str | None,
    model: str | None,
    config_path: Path,
    log_dir: Path | None = None,
    # The service.
    label: str = DEFAULT_LABEL,
    uid: int | None = None,
    # How to check.
    load_model: bool = False,
    timeout: float = 5.0,
    settle: float = 1.0,
    platform: str | None = None,
    # Production admission (see check_production_gates); None skips it.
    production: dict[str, Any] | None = None,
) -> list[CheckResult]:
    """Run every check, in order; never raises for a failed check.

    ``log_dir`` defaults to :func:`provider.logs.default_log_dir`. With
    ``load_model``, the model is loaded too (slow). ``timeout`` and
    ``settle`` are for :func:`check_coordinator`. ``platform`` (default: the
    host's) selects the macOS-only checks.
    """
    memory = total_memory_bytes(platform=platform)
    results = [
        check_python(),
        check_hardware(platform=platform),
        check_memory(platform=platform),
        check_mlx(platform=platform),
        # In a thread: loading a model blocks for seconds to minutes.
        await asyncio.to_thread(
            check_model, model, load=load_model, memory_bytes=memory, config_path=config_path
        ),
        check_config_file(config_path),
        check_token(
            token,
            config_path=config_path,
            protocol=str((production or {}).get("protocol", "v1")),
        ),
        *await check_coordinator(coordinator_url, token, timeout=timeout, settle=settle),
        check_service(label=label, uid=uid, config_path=config_path, platform=platform),
        check_log_dir(log_dir or default_log_dir(platform=host_platform(platform))),
    ]
    if production is not None:
        results += await check_production_gates(
            coordinator_url=coordinator_url, token=token, model=model, **production
        )
    return results


def format_results(results: list[CheckResult]) -> str:
    """One line a check (``ok``, ``FAIL`` or ``skip``), each fix under its failure,
    the production gates under their own heading, and a summary line (the
    gates are counted apart: a development setup need not pass them)."""
    width = max((len(r.name) for r in results), default=0)
    lines = []
    heading = False
    for r in results:
        if r.group == "production" and not heading:
            heading = True
            lines.append("production admission (a coordinator configured like production):")
        mark = "skip" if r.skipped else "ok" if r.ok else "FAIL"
        lines.append(f"{mark:<4}  {r.name:<{width}}  {r.detail}")
        if not r.ok and r.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {r.fix}")
    gates = sum(not r.ok for r in results if r.group == "production")
    if gates:
        lines.append(f"{gates} production gate{'s' if gates != 1 else ''} would refuse or "
                     "not route this provider")  # fmt: skip
    failed = sum(not r.ok for r in results if r.group != "production")
    lines.append(f"{failed} problem{'s' if failed != 1 else ''} found" if failed else "all good")
    return "\n".join(lines)
