"""What the coordinator would refuse, checked at start; close codes and what they mean."""

from __future__ import annotations

import random

import pytest
import tenacity

from provider.config import ConfigError, load_config
from provider.coordinator.admission import (
    compare_versions,
    compatibility_set_problem,
    provider_id_problem,
    required_version_from_reason,
    version_problem,
)
from provider.coordinator.reconnect import (
    BackoffPolicy,
    ConnectionLost,
    FatalRefusal,
    close_policy,
    wait_backoff,
)

SET_ID = "Augustas11/macprovider:v1.8.123@" + "0123456789abcdef" * 2 + "01234567"


@pytest.mark.parametrize(
    ("lhs", "rhs", "want"),
    # versionfloor_test.go TestCompareOrdersAndRejectsNonNumeric
    [
        ("1.8.33", "1.8.33", 0),
        ("1.8.32", "1.8.33", -1),
        ("1.8.65", "1.8.33", 1),
        ("v1.9", "1.8.99", 1),
        ("2", "1.8.65", 1),
        ("1.8.33-dev", "1.8.33", None),
        ("1.8.33", "1.8.33.1", None),
        ("", "1.0.0", None),
        ("1..3", "1.0.0", None),
        (" 1.8.65 ", "1.8.65", 0),
        ("1.-2", "1", None),
        ("\u0661.8", "1.8", None),  # Arabic-Indic digit: Go's '0'..'9' only
    ],
)
def test_version_compare_is_the_coordinators(lhs: str, rhs: str, want: int | None) -> None:
    assert compare_versions(lhs, rhs) == want


def test_version_problems() -> None:
    assert version_problem("1.8.123", "1.8.33") is None
    assert "below the required 1.8.33" in (version_problem("0.1.0", "1.8.33") or "")
    assert "bare" in (version_problem("1.9.0-rc1", "1.8.33") or "")
    assert "32 bytes" in (version_problem("1." * 20, None) or "")
    reason = "version_unsupported: binary_version 0.1.0 below required 1.8.33"
    assert required_version_from_reason(reason) == "1.8.33"


def test_provider_id_and_compatibility_set_syntax() -> None:
    assert provider_id_problem("mp-" + "0" * 32) is None
    assert provider_id_problem("a" * 65) and provider_id_problem("has space")
    assert compatibility_set_problem(SET_ID) is None
    for bad in ("macprovider:v1.8.123@" + "0" * 40, SET_ID.upper(), SET_ID + "x", "a/b:v1@x"):
        assert compatibility_set_problem(bad)


def test_config_refuses_ids_the_coordinator_would(tmp_path: object) -> None:
    base = {"coordinator_url": "ws://127.0.0.1:1/ws/provider", "model": "m"}
    with pytest.raises(ConfigError, match="provider_id"):
        load_config(None, environ={}, overrides=base | {"provider_id": "bad id!"})
    with pytest.raises(ConfigError, match="compatibility_set_id"):
        load_config(None, environ={}, overrides=base | {"compatibility_set_id": "nope"})
    config, _ = load_config(None, environ={}, overrides=base | {"compatibility_set_id": SET_ID})
    assert config.compatibility_set_id == SET_ID and config.protocol == "v2"
    assert config.request_timeout_s >= 900


@pytest.mark.parametrize(
    ("code", "reason", "action"),
    [
        (4004, "version_unsupported: binary_version 0.1.0 below required 1.8.33", "final"),
        (4009, "banned: provider x has been rejected by operator", "final"),
        (4003, "identity_signature_required", "at_cap"),
        (4005, "invalid_token", "at_cap"),
        (4005, "referral_required", "at_cap"),
        (4001, "invalid_hello: model_id", "at_cap"),
        (4001, "receipt_key_rotation_grace_active", "transient"),
        (4000, "unrecognized auth message", "at_cap"),
        (4007, "provisional_pool_full: max 10", "transient"),
        (4008, "provisional_rate_limited: max 5 admissions per hour", "transient"),
        (4012, "tier2_attestation_failed", "transient"),
        (4013, "tier2_encrypted_leg_required", "transient"),
        (4429, "too_many_unauthenticated_connections_per_ip", "transient"),
        (1000, "", "transient"),
        (None, "", "transient"),
    ],
)
def test_close_policy(code: int | None, reason: str, action: str) -> None:
    policy = close_policy(code, reason)
    assert policy.action == action
    if action != "transient":
        assert policy.fix


def test_fixes_say_what_to_do() -> None:
    refusal = FatalRefusal(4004, "version_unsupported: binary_version 0.1.0 below required 1.8.33")
    assert "1.8.33" in str(refusal) and "advertised_binary_version" in str(refusal)
    assert "referral_code" in (close_policy(4005, "referral_required").fix or "")
    assert "provider_token" in (close_policy(4005, "invalid_token").fix or "")


def _state(exc: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = 1
    state.set_exception((type(exc), exc, None))
    return state


def test_owner_fixable_codes_wait_at_the_cap_transient_ones_do_not() -> None:
    wait = wait_backoff(BackoffPolicy(initial=1, cap=60, jitter=0), random.Random(1))
    for code, reason in [(4003, "x"), (4005, "invalid_token"), (4001, "invalid_hello: x")]:
        assert wait(_state(ConnectionLost("closed", close_code=code, close_reason=reason))) == 60
    for code in (4007, 4008, 4013, 4429):
        assert wait(_state(ConnectionLost("closed", close_code=code))) == 1
