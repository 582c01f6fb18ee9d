"""The coordinator's small validation rules, ported from its Go code (pure).

Sources: ``internal/config`` (provider and compatibility-set ids),
``internal/versionfloor`` (version comparison), ``internal/modelidentity``
(digests and algorithms), ``internal/auth`` (bootstrap principals) and
``internal/ws/messages.go`` (control characters).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from .gojson import INT64_MAX

PROVIDER_ID_PATTERN: Final = re.compile(r"[a-zA-Z0-9_.-]{1,64}")
COMPATIBILITY_SET_ID_PATTERN: Final = re.compile(
    r"[A-Za-z0-9_.-]{1,64}/[A-Za-z0-9_.-]{1,100}:v[0-9]+\.[0-9]+\.[0-9]+@[0-9a-f]{40}"
)
MAX_COMPATIBILITY_SET_ID_BYTES: Final = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOWER_HEX = re.compile(r"[0-9a-f]+")

SNAPSHOT_MANIFEST_V1: Final = "macprovider.snapshot-manifest.v1"
GGUF_FILE_V1: Final = "macprovider.gguf-file.v1"
SAFETENSORS_MANIFEST_V1: Final = "macprovider.safetensors-manifest.v1"

#: ``runtime_source`` values the coordinator knows (``mlx_cache`` is the
#: native engine; the rest are the BYOM loopback classes).
RUNTIME_SOURCES: Final = frozenset(
    {
        "mlx_cache",
        "ollama_loopback",
        "lmstudio_loopback",
        "llamacpp_loopback",
        "openai_compatible_loopback",
        "mlxlm_loopback",
        "omlx_loopback",
    }
)

#: Provider states (heartbeat ``status``, ``state_update.state``).
STATES: Final = frozenset({"ready", "busy", "degraded", "draining", "unavailable"})


def contains_control_char(value: str) -> bool:
    """C0 (< U+0020), DEL or C1 (U+0080..U+009F) anywhere in ``value`` (``containsControlChar``)."""
    return any(c < "\x20" or c == "\x7f" or "\x80" <= c <= "\x9f" for c in value)


def valid_provider_id(value: str) -> bool:
    """``^[a-zA-Z0-9_.-]{1,64}$`` (``config.ValidateProviderID``)."""
    return PROVIDER_ID_PATTERN.fullmatch(value) is not None


def valid_compatibility_set_id(value: str) -> bool:
    """The release-manifest id grammar, at most 256 bytes (``ValidateCompatibilitySetID``)."""
    size = len(value.encode())
    return 0 < size <= MAX_COMPATIBILITY_SET_ID_BYTES and (
        COMPATIBILITY_SET_ID_PATTERN.fullmatch(value) is not None
    )


def is_bootstrap_principal(provider_id: str) -> bool:
    """``mp-`` followed by 32 lowercase hex digits (``auth.IsCredentialBootstrapPrincipal``)."""
    return (
        len(provider_id) == 35
        and provider_id.startswith("mp-")
        and _LOWER_HEX.fullmatch(provider_id[3:]) is not None
    )


def valid_sha256(value: str) -> bool:
    """64 lowercase hex digits, nothing around them (``modelidentity.ValidSHA256``)."""
    return _SHA256.fullmatch(value) is not None


def canonical_algorithm(value: str) -> bool:
    """A model-identity algorithm the coordinator accepts."""
    return value in (SNAPSHOT_MANIFEST_V1, GGUF_FILE_V1)


def normalize_supported_model(value: str) -> str:
    """NFC, then ASCII-only lowercasing: the duplicate key for ``supported_models``."""
    nfc = unicodedata.normalize("NFC", value)
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in nfc)


# ---------------------------------------------------------------------------
# Versions (versionfloor.Compare)


def _version_parts(value: str) -> list[int] | None:
    value = value.strip().lstrip("vV")
    if not value:
        return None
    fields = value.split(".")
    if len(fields) > 3:
        return None
    parts = []
    for piece in fields:
        piece = piece.strip()
        if not piece or not all("0" <= c <= "9" for c in piece):
            return None
        number = int(piece)
        if number > INT64_MAX:
            return None
        parts.append(number)
    while len(parts) < 3:
        parts.append(0)
    return parts


def compare_versions(lhs: str, rhs: str) -> int | None:
    """-1, 0 or 1; ``None`` when either side is not a 1-to-3 part numeric version."""
    left, right = _version_parts(lhs), _version_parts(rhs)
    if left is None or right is None:
        return None
    return (left > right) - (left < right)


def valid_version(value: str) -> bool:
    """Whether ``value`` is a bare numeric version (``versionfloor.Valid``)."""
    return _version_parts(value) is not None


def below_floor(binary_version: str, required: str) -> bool:
    """Whether ``binary_version`` fails the floor ``required`` (unparseable fails)."""
    cmp = compare_versions(binary_version, required)
    return cmp is None or cmp < 0
