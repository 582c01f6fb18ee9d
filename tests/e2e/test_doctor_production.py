"""``mlx-provider doctor --production`` against the stub in its production profile.

A config that passes every gate is admitted (the doctor's probe gets the
coordinator's challenge); then each gate is misconfigured in turn and the
doctor must name it and its fix: the protocol, the binary floor, the token,
the credentials for a first start, the compatibility set (missing, and one
the coordinator does not accept), the catalog (off, untrusted key, a model
it does not list, files that differ from the published ones), the model's
identity (a Hugging Face cache snapshot), and a final refusal the agent
received.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator_stub.app import CoordinatorStub
from provider.cli import main
from provider.config import load_config
from tests.session.conftest import running
from tests.session.scripted_engine import ScriptedEngine

from .test_protocol_e2e import (
    BOOTSTRAP_ID,
    COMPAT,
    REFERRAL,
    production_settings,
    production_stub,
    write_config,
)

TOKEN = "ptok_doctor_0123456789abcdef"
PID = "prov-doctor"
Gates = dict[str, tuple[str, str, str]]


@pytest.fixture
async def stub(model_dir: Path) -> AsyncIterator[CoordinatorStub]:
    async with production_stub(model_dir, tokens=(TOKEN,)) as s:
        yield s


async def doctor(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, Gates]:
    """Run ``mlx-provider doctor --production``: exit code, and every check as
    ``{name: (mark, detail, fix)}`` (the production gates and the general checks)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["doctor", "--production", "--config", str(config)])
    lines = capsys.readouterr().out.splitlines()
    assert "production admission (a coordinator configured like production):" in lines
    gates: Gates = {}
    last = ""
    for line in lines:
        mark = line[:4].strip()
        if mark in ("ok", "FAIL", "skip"):
            name, _, detail = line[6:].partition("  ")
            last = name.strip()
            gates[last] = (mark, detail.strip(), "")
        elif line.strip().startswith("fix: ") and last:
            mark, detail, _ = gates[last]
            gates[last] = (mark, detail, line.strip().removeprefix("fix: "))
    return code, gates


def config(tmp_path: Path, stub: CoordinatorStub, model_dir: Path, **changes: Any) -> Path:
    """The good production config with ``changes`` (a value None drops the key)."""
    settings = production_settings(provider_id=PID, provider_token=TOKEN) | changes
    settings = {k: v for k, v in settings.items() if v is not None}
    return write_config(tmp_path / "config.toml", stub, model_dir, **settings)


def failed(gates: Gates) -> dict[str, tuple[str, str]]:
    return {name: (detail, fix) for name, (mark, detail, fix) in gates.items() if mark == "FAIL"}


async def test_a_production_ready_config_passes_every_gate(
    stub: CoordinatorStub, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, gates = await doctor(config(tmp_path, stub, model_dir), capsys)
    assert failed(gates) == {}
    assert gates["admission probe"][0] == "ok", gates["admission probe"]
    assert "admits this registration" in gates["admission probe"][1]
    assert gates["catalog"][0] == "ok" and "row tiny" in gates["catalog"][1]
    assert stub.providers() == {} and stub.rejections == []  # the probe registered nothing


@pytest.mark.parametrize(
    ("changes", "gate", "detail", "fix"),
    [
        ({"protocol": "v1"}, "protocol", "4013", 'protocol = "v2"'),
        ({"advertised_binary_version": "1.8.0"}, "binary version", "1.8.0", "1.8.33"),
        ({"advertised_binary_version": "1.8.0"}, "admission probe",
         "close 4004 (binary version unsupported) version_unsupported: binary_version 1.8.0 "
         "below required 1.8.33", "advertised_binary_version to 1.8.33 or later"),
        ({"provider_token": "ptok_not_the_token_0123"}, "admission probe",
         "close 4005 (invalid provider token) invalid_token", "the provider token was refused"),
        ({"provider_token": "ptok_not_the_token_0123"}, "coordinator websocket" , "4005",
         "the provider token was refused"),
        ({"provider_token": None, "provider_id": BOOTSTRAP_ID}, "credentials",
         "referral_required", "set referral_code"),
        ({"compatibility_set_id": None}, "compatibility set", "compatibility_set_required",
         "set compatibility_set_id"),
        ({"compatibility_set_id": None}, "admission probe", "compatibility_set_required",
         "set compatibility_set_id"),
        ({"compatibility_set_id": COMPAT[:-40] + "d" * 40}, "admission probe",
         "compatibility_set_unaccepted", "a compatibility_set_id the coordinator accepts"),
        ({"catalog_feed_url": "off"}, "catalog", "legacy, never routed", "catalog_feed_url"),
        ({"model_id": "some-org/uncatalogued"}, "catalog", "uncatalogued", "model_id"),
    ],
)  # fmt: skip
async def test_each_misconfigured_gate_is_named_with_its_fix(
    stub: CoordinatorStub,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    gate: str,
    detail: str,
    fix: str,
) -> None:
    code, gates = await doctor(config(tmp_path, stub, model_dir, **changes), capsys)
    assert code == 1
    problems = failed(gates)
    assert gate in problems, gates
    assert detail in problems[gate][0], problems[gate]
    assert fix in problems[gate][1], problems[gate]
    assert stub.providers() == {}


async def test_an_untrusted_catalog_key_is_named(
    stub: CoordinatorStub, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, stub, model_dir)
    other_key = "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMDA="
    cfg.write_text(cfg.read_text().replace(stub.catalog_public_key, other_key))
    _, gates = await doctor(cfg, capsys)
    detail, fix = failed(gates)["catalog"]
    assert "signature" in detail and "catalog_public_keys" in fix


async def test_model_files_that_are_not_the_published_ones(
    stub: CoordinatorStub, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy" / model_dir.name
    shutil.copytree(model_dir, copy)
    (copy / "README.md").write_text("a file the publisher did not ship\n")
    _, gates = await doctor(config(tmp_path, stub, model_dir, model=str(copy)), capsys)
    detail, fix = failed(gates)["catalog"]
    assert "differs from this model's" in detail and "never routed" in detail
    assert "published snapshot" in fix


def hf_cache_snapshot(model_dir: Path, root: Path) -> Path:
    """``model_dir`` laid out as a Hugging Face cache: a snapshot of symlinks to blobs."""
    blobs, snapshot = root / "blobs", root / "snapshots" / model_dir.name
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    return snapshot


async def test_a_hugging_face_cache_snapshot_cannot_be_identified(
    stub: CoordinatorStub, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = hf_cache_snapshot(model_dir, tmp_path)
    _, gates = await doctor(config(tmp_path, stub, model_dir, model=str(snapshot)), capsys)
    detail, _ = failed(gates)["model identity"]
    assert "symlink" in detail and "--local-dir" in detail


async def test_a_final_refusal_the_agent_received_is_named(
    stub: CoordinatorStub, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The agent itself meets the floor (4004), stops, and keeps the refusal.
    cfg = config(tmp_path, stub, model_dir, advertised_binary_version="1.0.0")
    loaded, path = load_config(cfg)
    async with running(loaded, ScriptedEngine(), config_path=path) as run:
        assert await asyncio.wait_for(run.task, 20) == 0
    cfg.write_text(cfg.read_text().replace('"1.0.0"', '"1.8.123"'))  # fixed since
    _, gates = await doctor(cfg, capsys)
    detail, fix = failed(gates)["last refusal"]
    assert "4004" in detail and "below required 1.8.33" in detail
    assert "1.8.33" in fix and gates["binary version"][0] == "ok"


async def test_credentials_for_a_first_start(
    stub: CoordinatorStub, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No token yet: a bootstrap id with a referral code passes; the probe is
    # skipped (the coordinator rate-limits bootstrap attempts).
    cfg = config(
        tmp_path, stub, model_dir, provider_token=None, provider_id=BOOTSTRAP_ID,
        referral_code=REFERRAL,
    )  # fmt: skip
    _, gates = await doctor(cfg, capsys)
    assert failed(gates) == {}
    assert gates["admission probe"][0] == "skip" and stub.bootstraps == []
