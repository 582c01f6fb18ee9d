"""Agent configuration: TOML file, then ``MLX_PROVIDER_*`` environment, then flags.

:func:`load_config` merges the three layers (later wins), decodes the result
into :class:`Config` and checks it, so a bad key or value stops the agent at
start with one line naming the key, where it came from and the fix
(:class:`ConfigError`).

The file defaults to ``~/.config/mlx-provider/config.toml``. Because it may
hold the provider token, a file with a token and permissions wider than 0600
is refused with the ``chmod`` to run. Keys the agent learns at run time
(a generated ``provider_id``, an ``assigned_provider_token``) are written back
with :func:`persist_keys`, atomically and with mode 0600.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import tempfile
import tomllib
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ENV_PREFIX = "MLX_PROVIDER_"
DEFAULT_CONFIG_PATH = Path("~/.config/mlx-provider/config.toml")
#: Shortest ``provider_token`` accepted. The coordinator issues 64 hex
#: characters; the logs redact the token wherever it appears, which needs at
#: least ``provider.logs.MIN_SECRET_LENGTH`` characters to leave words alone.
MIN_TOKEN_LENGTH = 16


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the key and the fix."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every setting of the agent, with its default.

    Connection: ``coordinator_url`` (``wss://``; ``ws://`` only to loopback),
    ``provider_id`` (generated and persisted when absent), ``provider_token``,
    ``proxy`` (``None``: connect directly, whatever the environment says),
    ``ws_pings`` (WebSocket control pings; off because the real coordinator
    drops sessions that ping after 10 s of its own write-idleness).

    Serving: ``model`` (a local directory or a Hugging Face repo id),
    ``max_concurrency``, ``max_context_tokens`` (``None``: the model's),
    ``default_max_tokens``, ``prefill_step_size`` (the most prompt tokens
    in one prefill chunk), ``prefill_slice_ms`` (how long one prefill chunk
    should take; ``None``: 100 ms, or 3 of the model's decode steps when
    that is longer; 0: fixed ``prefill_step_size`` chunks), ``chunk_interval_ms``
    (how long tokens are coalesced into one ``inference_response_chunk``
    after the first), ``drain_timeout_s`` (then what still runs is
    cancelled), ``request_timeout_s`` (a request running longer ends
    ``provider_timeout``).

    Memory and speed (:class:`provider.engine.mlx.MlxEngine` documents each):
    ``memory_budget_bytes`` (``None``: what MLX recommends or 3/4 of RAM,
    less the weights), ``prompt_cache_bytes`` (``None``: 1/8 of RAM, at most
    half the budget; 0 turns the prefix cache off), ``prompt_cache_entries``,
    ``kv_bits``/``kv_group_size``/``quantized_kv_start`` (KV-cache
    quantization), ``draft_model``/``num_draft_tokens`` (speculative
    decoding with a draft model), ``prompt_lookup`` (``auto``/``on``/``off``:
    speculative decoding from the prompt itself).

    Timers: ``send_timeout_s`` bounds every send; ``backoff_*`` and
    ``stable_after_s`` (a session registered this long resets the backoff)
    are documented on :mod:`provider.coordinator.reconnect`.

    Local: ``status_host``/``status_port`` (0 disables the endpoint),
    ``log_level``, ``log_file``, ``log_json`` (``None``: JSON unless stderr
    is a TTY), ``keep_awake`` (``"serving"`` holds a no-idle-sleep assertion
    while a job runs, ``"always"`` from start, ``"never"``).

    The owner's machine first (:mod:`provider.host.guard`): ``host_guard``
    (hold back on critical memory pressure, serious or critical heat and,
    with ``pause_on_battery``, battery power; off: report only),
    ``host_recover_s`` (how long a condition must stay away before the
    provider offers its slots again), ``host_sample_interval_s`` (how often
    the machine is read).

    Admission (protocol v2 and a production coordinator's gates):
    ``protocol`` (``"v2"``: ``auth_request`` and the encrypted leg; ``"v1"``:
    ``hello``, for older coordinators), ``referral_code`` (credential
    bootstrap without a token), ``compatibility_set_id``,
    ``advertised_binary_version`` (``None``: the package version),
    ``model_id`` (``None``: the model directory's name or the repo id),
    ``catalog_feed_url`` (``None``: ``https://<coordinator host>/v1/
    autotune-candidates``; ``"off"``: send no catalog fields),
    ``catalog_public_keys`` (key id -> standard-base64 Ed25519 public key;
    ``None``: the production keys), ``admission_identity`` (keep and present
    a durable admission identity key).
    """

    coordinator_url: str | None = None
    provider_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    provider_token: str | None = None
    proxy: str | None = None
    ws_pings: bool = False

    model: str | None = None
    max_concurrency: Annotated[int, Meta(ge=1, le=64)] = 1
    max_context_tokens: Annotated[int, Meta(ge=16)] | None = None
    default_max_tokens: Annotated[int, Meta(ge=1)] = 512
    prefill_step_size: Annotated[int, Meta(ge=1)] = 512
    prefill_slice_ms: Annotated[float, Meta(ge=0, le=60_000)] | None = None
    chunk_interval_ms: Annotated[float, Meta(ge=0, le=1000)] = 20.0
    drain_timeout_s: Annotated[float, Meta(ge=0)] = 300.0
    # Not below the coordinator's routing.request_timeout_s (900 s).
    request_timeout_s: Annotated[float, Meta(gt=0)] = 900.0

    memory_budget_bytes: Annotated[int, Meta(ge=0)] | None = None
    prompt_cache_bytes: Annotated[int, Meta(ge=0)] | None = None
    prompt_cache_entries: Annotated[int, Meta(ge=0)] = 32
    kv_bits: Annotated[int, Meta(ge=2, le=8)] | None = None
    kv_group_size: Annotated[int, Meta(ge=32, le=128)] = 64
    quantized_kv_start: Annotated[int, Meta(ge=0)] = 5000
    draft_model: str | None = None
    num_draft_tokens: Annotated[int, Meta(ge=1, le=16)] = 3
    prompt_lookup: Literal["auto", "on", "off"] = "auto"

    send_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    backoff_initial_s: Annotated[float, Meta(gt=0)] = 1.0
    backoff_max_s: Annotated[float, Meta(gt=0)] = 60.0
    backoff_jitter: Annotated[float, Meta(ge=0, le=1)] = 0.1
    stable_after_s: Annotated[float, Meta(ge=0)] = 10.0

    status_host: str = "127.0.0.1"
    status_port: Annotated[int, Meta(ge=0, le=65535)] = 8765
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: str | None = None
    log_json: bool | None = None
    keep_awake: Literal["serving", "always", "never"] = "serving"

    host_guard: bool = True
    pause_on_battery: bool = True
    host_recover_s: Annotated[float, Meta(ge=0)] = 60.0
    host_sample_interval_s: Annotated[float, Meta(gt=0, le=60)] = 5.0

    protocol: Literal["v1", "v2"] = "v2"
    referral_code: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    compatibility_set_id: str | None = None
    advertised_binary_version: Annotated[str, Meta(min_length=1, max_length=32)] | None = None
    model_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    catalog_feed_url: str | None = None
    catalog_public_keys: dict[str, str] | None = None
    admission_identity: bool = False


_FIXES = {
    "coordinator_url": 'set coordinator_url = "wss://HOST/ws/provider" or pass --coordinator',
    "model": "set model to a local model directory or a Hugging Face repo id, or pass --model",
    "provider_token": "set provider_token in the config file or MLX_PROVIDER_PROVIDER_TOKEN",
}


def _field_from_error(message: str) -> str | None:
    match = re.search(r"at `\$\.(\w+)`", message) or re.search(r"unknown field `(\w+)`", message)
    return match.group(1) if match else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc}); fix the syntax") from None
    if "provider_token" in data and os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"config file {path} holds provider_token but has mode {mode:04o}, readable "
                f"by others; run: chmod 600 {path}"
            )
    return data


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in Config.__struct_fields__:
            raise ConfigError(f"environment {name}: unknown setting {key!r}; unset it")
        values[key] = None if raw == "" else raw
    return values


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    require: tuple[str, ...] = ("coordinator_url", "model"),
) -> tuple[Config, Path]:
    """Build the configuration from file, environment and ``overrides`` (flags).

    ``path`` ``None`` means ``$MLX_PROVIDER_CONFIG`` or the default path; a
    missing file is fine when it was not named explicitly. ``overrides`` with
    value ``None`` are ignored (flags not given). Keys in ``require`` must be
    set by some layer. Returns the config and the file path (existing or not)
    that run-time keys are persisted to.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or bool(environ.get(ENV_PREFIX + "CONFIG"))
    path = Path(path or environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH).expanduser()
    merged: dict[str, Any] = {}
    if path.exists():
        merged.update(_read_file(path))
    elif explicit:
        raise ConfigError(f"config file {path} does not exist; create it or drop --config")
    layers = [("environment", _read_env(environ)), ("flag", dict(overrides or {}))]
    for _, layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    try:
        # strict=False lets "4" from the environment become 4.
        config = msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        key = _field_from_error(str(exc)) or "?"
        source = next((n for n, layer in reversed(layers) if key in layer), f"config file {path}")
        if source == "environment":
            source = f"environment {ENV_PREFIX}{key.upper()}"
        raise ConfigError(f"{source}: {key}: {exc}") from None
    for key in require:
        if getattr(config, key) is None:
            raise ConfigError(f"{key} is not set; {_FIXES.get(key, 'set it')}")
    check_config(config)
    return config, path


#: The coordinator's provider_id rule (config.ValidateProviderID).
PROVIDER_ID_PATTERN = re.compile(r"[a-zA-Z0-9_.-]{1,64}")
#: A compatibility set id: OWNER/NAME:vX.Y.Z@<40 hex>, at most 256 bytes.
COMPATIBILITY_SET_PATTERN = re.compile(
    r"[A-Za-z0-9_.-]{1,64}/[A-Za-z0-9_.-]{1,100}:v[0-9]+\.[0-9]+\.[0-9]+@[0-9a-f]{40}"
)


def check_config(config: Config) -> None:
    """Checks that need more than a type: URL scheme and host, loopback status,
    and the coordinator's own syntax rules for ids it would refuse."""
    if config.coordinator_url is not None:
        check_coordinator_url(config.coordinator_url)
    if config.kv_bits is not None and config.kv_bits not in (2, 3, 4, 6, 8):
        raise ConfigError(f"kv_bits: {config.kv_bits} is not supported; use 2, 3, 4, 6 or 8")
    if config.kv_group_size not in (32, 64, 128):
        raise ConfigError(f"kv_group_size: {config.kv_group_size}; use 32, 64 or 128")
    if config.provider_token:
        check_provider_token(config.provider_token)
    if config.provider_id is not None and not PROVIDER_ID_PATTERN.fullmatch(config.provider_id):
        raise ConfigError(
            f"provider_id: {config.provider_id!r} is refused by the coordinator; use 1 to 64 "
            "letters, digits, '_', '.' or '-' (or remove it to have one generated)"
        )
    set_id = config.compatibility_set_id
    if set_id is not None and (
        len(set_id.encode()) > 256 or not COMPATIBILITY_SET_PATTERN.fullmatch(set_id)
    ):
        raise ConfigError(
            f"compatibility_set_id: {set_id!r} is not OWNER/NAME:vX.Y.Z@<40 hex digits>; "
            "copy it exactly as the marketplace publishes it"
        )
    feed = config.catalog_feed_url
    if feed is not None and feed != "off":
        parts = urllib.parse.urlsplit(feed)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f'catalog_feed_url: {feed!r} is not an http(s) URL (or "off")')
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ConfigError("catalog_feed_url: plain http:// only to loopback; use https://")
    if not is_loopback(config.status_host):
        raise ConfigError(
            f"status_host: {config.status_host!r} is not a loopback address; "
            "the status endpoint binds 127.0.0.1 or ::1 only"
        )


def check_provider_token(token: str) -> None:
    """Refuse a token that cannot be a real one; the message never shows it."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"provider_token: {len(token)} characters is too short to be a real token (at "
            f"least {MIN_TOKEN_LENGTH}; the coordinator issues 64), and the logs could not "
            "redact it without mangling ordinary words; set the token the marketplace gave you"
        )
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            "provider_token: contains whitespace or control characters, which cannot travel "
            "in an HTTP header; copy the token again without them"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_coordinator_url(url: str) -> None:
    """Refuse what would leak the token: plain ws:// off loopback, userinfo."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"coordinator_url: not a valid URL ({exc})") from None
    # Credentials first: the errors below may show the URL's host.
    if parts.username is not None or parts.password is not None:
        raise ConfigError("coordinator_url: credentials in the URL are refused; use provider_token")
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"coordinator_url: scheme must be wss:// (got {parts.scheme}://)")
    if not parts.hostname:
        raise ConfigError("coordinator_url: the URL has no host")
    if parts.scheme == "ws" and not is_loopback(parts.hostname):
        raise ConfigError(
            f"coordinator_url: plain ws:// is allowed only to loopback; use wss://{parts.netloc}"
        )


def _toml_value(value: Any) -> str:
    # A JSON string is a valid TOML basic string for everything we persist.
    return json.dumps(value)


def persist_keys(path: Path, values: Mapping[str, str]) -> None:
    """Set top-level ``key = "value"`` lines in the TOML file at ``path``.

    Other lines, comments and tables are kept. The new file is written next
    to the old one with mode 0600, flushed to disk, then renamed over it, so
    a crash leaves either the old or the new file, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    first_table = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    for key, value in values.items():
        new = f"{key} = {_toml_value(value)}"
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(first_table):
            if pattern.match(lines[i]):
                lines[i] = new
                break
        else:
            lines.insert(first_table, new)
            first_table += 1
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # never write a file we could not read back
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_id_from(model: str) -> str:
    """The model id to register: a local directory's name, or the repo id as given."""
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def ensure_provider_id(config: Config, path: Path) -> Config:
    """Return ``config`` with a provider_id, generating and persisting one once.

    A generated id is ``mp-`` and 32 hex digits: the form a credential
    bootstrap (a first start without a token) needs.
    """
    if config.provider_id:
        return config
    provider_id = f"mp-{uuid.uuid4().hex}"
    persist_keys(path, {"provider_id": provider_id})
    return msgspec.structs.replace(config, provider_id=provider_id)
