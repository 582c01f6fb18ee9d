"""What the coordinator checks before it admits a provider, checked here first. Pure.

The coordinator refuses a bad ``provider_id`` or compatibility set id with a
close code and a terse reason; checking the same rules at start turns that
into one line that names the setting and the fix. Version comparison is the
coordinator's ``versionfloor.Compare``: 1 to 3 dot-separated numbers, an
optional leading ``v``, no pre-release suffix.
"""

from __future__ import annotations

import re

from provider.config import COMPATIBILITY_SET_PATTERN, PROVIDER_ID_PATTERN

__all__ = [
    "BOOTSTRAP_PROVIDER_ID",
    "COMPATIBILITY_SET_ID",
    "MAX_CONCURRENCY_CEILING",
    "PRODUCTION_REQUIRED_BINARY_VERSION",
    "PROVIDER_ID",
    "compare_versions",
    "compatibility_set_problem",
    "provider_id_problem",
    "required_version_from_reason",
    "version_problem",
]

#: The coordinator's ``config.ValidateProviderID``.
PROVIDER_ID = PROVIDER_ID_PATTERN
#: A credential-bootstrap principal: ``mp-`` and 32 lowercase hex digits.
BOOTSTRAP_PROVIDER_ID = re.compile(r"mp-[0-9a-f]{32}")
#: ``owner/name:vX.Y.Z@<40-hex commit>``, at most 256 bytes.
COMPATIBILITY_SET_ID = COMPATIBILITY_SET_PATTERN
MAX_COMPATIBILITY_SET_ID_BYTES = 256
#: ``pool.max_concurrency_ceiling`` (default and production): more is clamped.
MAX_CONCURRENCY_CEILING = 8
#: ``required_binary_version`` of the production coordinator (dist/coordinator.yaml).
PRODUCTION_REQUIRED_BINARY_VERSION = "1.8.33"
MAX_BINARY_VERSION_BYTES = 32


def provider_id_problem(provider_id: str) -> str | None:
    """Why the coordinator would refuse ``provider_id``, or None."""
    if not PROVIDER_ID.fullmatch(provider_id):
        return (
            f"provider_id {provider_id!r} must be 1 to 64 characters of letters, digits, "
            "'_', '.' or '-' (the coordinator's ^[a-zA-Z0-9_.-]{1,64}$)"
        )
    return None


def compatibility_set_problem(set_id: str) -> str | None:
    """Why ``set_id`` is not a syntactically valid compatibility set id, or None."""
    if len(set_id.encode()) > MAX_COMPATIBILITY_SET_ID_BYTES:
        return f"compatibility_set_id is longer than {MAX_COMPATIBILITY_SET_ID_BYTES} bytes"
    if not COMPATIBILITY_SET_ID.fullmatch(set_id):
        return (
            f"compatibility_set_id {set_id!r} is not of the form "
            "OWNER/NAME:vX.Y.Z@<40 hex digits> (e.g. "
            "Augustas11/macprovider:v1.8.123@<commit>)"
        )
    return None


def _parts(version: str) -> list[int] | None:
    text = version.strip().lstrip("vV")
    fields = text.split(".") if text else []
    if not 1 <= len(fields) <= 3:
        return None
    out = []
    for item in fields:
        item = item.strip()
        if not item or not item.isascii() or not item.isdigit():
            return None
        out.append(int(item))
    return out + [0] * (3 - len(out))


def compare_versions(left: str, right: str) -> int | None:
    """-1, 0 or 1 like ``versionfloor.Compare``; None when either side does not parse."""
    a, b = _parts(left), _parts(right)
    if a is None or b is None:
        return None
    return (a > b) - (a < b)


def version_problem(binary_version: str, required: str | None) -> str | None:
    """Why ``binary_version`` would be refused (4004 or 4001), or None."""
    if len(binary_version.encode()) > MAX_BINARY_VERSION_BYTES:
        return f"binary version {binary_version!r} is longer than {MAX_BINARY_VERSION_BYTES} bytes"
    if required is None:
        return None
    order = compare_versions(binary_version, required)
    if order is None:
        return (
            f"binary version {binary_version!r} is not a bare X.Y.Z version; the coordinator "
            f"treats it as below the required {required}"
        )
    if order < 0:
        return f"binary version {binary_version} is below the required {required}"
    return None


_BELOW_REQUIRED = re.compile(r"below required\s+(\S+)")


def required_version_from_reason(reason: str) -> str | None:
    """The floor in a 4004 reason (``... below required 1.8.33``), as Swift parses it."""
    match = _BELOW_REQUIRED.search(reason)
    return match.group(1).rstrip(".,;") if match else None
