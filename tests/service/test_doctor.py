from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from provider.ops import doctor
from provider.ops.doctor import (
    CheckResult,
    check_hardware,
    check_log_dir,
    check_memory,
    check_model,
    check_service,
    format_results,
    run_checks,
)
from tests.service.helpers import FakeBin

TOKEN = "prov_tok_8c1f0e2d9a7b"


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny"
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 4096)
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'provider_token = "{TOKEN}"\n')
    path.chmod(0o600)
    return path


@pytest.fixture
async def coordinator() -> AsyncIterator[Server]:
    """A WebSocket server that accepts only ``Authorization: Bearer TOKEN``."""

    def check_auth(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return connection.respond(401, "bad token\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path == "/kick":
            await ws.close(4401, "token revoked")
            return
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=check_auth) as server:
        yield server


def url_of(server: Server, path: str = "/ws/provider") -> str:
    port = server.sockets[0].getsockname()[1]
    return f"ws://127.0.0.1:{port}{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_passing_configuration(
    coordinator: Server, model_dir: Path, config_file: Path, tmp_path: Path
) -> None:
    results = await run_checks(
        coordinator_url=url_of(coordinator),
        token=TOKEN,
        model=str(model_dir),
        config_path=config_file,
        log_dir=tmp_path / "logs",
        settle=0,
        platform="linux",
    )
    assert [r.name for r in results] == [
        "python",
        "apple silicon",
        "memory",
        "mlx",
        "model",
        "config file",
        "provider token",
        "coordinator tcp",
        "coordinator websocket",
        "launchd service",
        "log directory",
    ]
    failed = [r for r in results if not r.ok]
    assert failed == []
    checks = by_name(results)
    assert checks["apple silicon"].skipped and checks["launchd service"].skipped
    assert checks["coordinator websocket"].detail.startswith("handshake accepted (HTTP 101)")
    assert checks["provider token"].detail == f"set ({len(TOKEN)} characters)"
    assert checks["log directory"].detail.endswith("(will be created)")
    report = format_results(results)
    assert report.endswith("all good")
    assert TOKEN not in report


@pytest.fixture
def public_config(config_file: Path) -> Path:
    config_file.chmod(0o644)
    return config_file


async def test_failing_configuration(tmp_path: Path, public_config: Path) -> None:
    config_file = public_config
    missing_model = tmp_path / "models" / "absent"
    port = free_port()
    results = await run_checks(
        coordinator_url=f"ws://127.0.0.1:{port}/ws/provider",
        token=TOKEN,
        model=str(missing_model),
        config_path=config_file,
        log_dir=config_file / "logs",  # under a regular file: cannot exist
        platform="linux",
    )
    checks = by_name(results)
    assert checks["config file"].ok is False
    assert checks["config file"].detail == (
        f"{config_file} holds provider_token but has mode 0644 (readable by others)"
    )
    assert checks["config file"].fix == f"chmod 600 {config_file}"
    assert checks["model"].ok is False
    assert checks["model"].detail == f"model directory {missing_model} does not exist"
    assert checks["model"].fix == (
        f"download the model there, or set model in {config_file} to the right directory"
    )
    tcp = checks["coordinator tcp"]
    assert tcp.ok is False
    assert tcp.detail.startswith(f"cannot connect to 127.0.0.1:{port}")
    assert tcp.fix == "check coordinator_url, your network and firewall; is the coordinator up?"
    assert checks["coordinator websocket"].skipped
    assert checks["log directory"].ok is False
    assert (
        checks["log directory"].fix == f"remove or rename {config_file}, or set log_file elsewhere"
    )
    lines = format_results(results).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("FAIL  config file  "))
    assert lines[at + 1].split() == ["fix:", "chmod", "600", str(config_file)]
    report = "\n".join(lines)
    assert report.endswith("4 problems found")
    assert TOKEN not in report


async def test_token_refused_reports_http_status(coordinator: Server) -> None:
    tcp, ws = await doctor.check_coordinator(url_of(coordinator), "wrong-token", settle=0)
    assert tcp.ok
    assert ws.ok is False
    assert ws.detail == "HTTP 401: the coordinator refused the token"
    assert ws.fix is not None and "provider_token" in ws.fix
    assert "wrong-token" not in ws.detail


async def test_close_after_handshake_reports_the_code(coordinator: Server) -> None:
    _, ws = await doctor.check_coordinator(url_of(coordinator, "/kick"), TOKEN, settle=5)
    assert ws.ok is False
    assert (
        ws.detail == "handshake accepted, then closed by the coordinator: code 4401 (token revoked)"
    )
    assert ws.fix is not None and "provider_token" in ws.fix


async def test_missing_url_and_token(coordinator: Server) -> None:
    [tcp] = await doctor.check_coordinator(None, TOKEN)
    assert not tcp.ok and tcp.fix is not None and "coordinator_url" in tcp.fix
    [bad] = await doctor.check_coordinator("https://c.example", TOKEN)
    assert not bad.ok and "not a ws:// or wss:// URL" in bad.detail
    _, ws = await doctor.check_coordinator(url_of(coordinator), None)
    assert ws.skipped and ws.detail == "skipped: no token"
    token = doctor.check_token(None, config_path=Path("/c.toml"))
    assert not token.ok and token.fix == (
        "set provider_token in /c.toml (or MLX_PROVIDER_PROVIDER_TOKEN)"
    )


def test_config_file_checks(tmp_path: Path) -> None:
    missing = doctor.check_config_file(tmp_path / "none.toml")
    assert not missing.ok and missing.fix is not None and "create" in missing.fix
    broken = tmp_path / "broken.toml"
    broken.write_text("model = \n")
    assert doctor.check_config_file(broken).fix == "fix its syntax"
    no_token = tmp_path / "public.toml"
    no_token.write_text('model = "m"\n')
    no_token.chmod(0o644)
    assert doctor.check_config_file(no_token).ok  # nothing secret in it


def test_model_dir_missing_files(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "model.safetensors").unlink()
    result = check_model(str(model_dir))
    assert not result.ok
    assert result.detail == f"{model_dir} lacks *.safetensors, tokenizer.json or tokenizer.model"
    assert result.fix == f"download the complete model into {model_dir}"
    assert check_model(None).fix == (
        "set model to a local model directory or a Hugging Face repo id"
    )


def test_model_too_big_for_memory(model_dir: Path) -> None:
    result = check_model(str(model_dir), memory_bytes=4096)
    assert not result.ok
    assert "more than 75% of" in result.detail
    assert check_model(str(model_dir), memory_bytes=1024**3).ok


def test_model_load_failure_is_reported(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(path: Path) -> float:
        raise ValueError(f"Model type foo not supported ({path.name})")

    monkeypatch.setattr(doctor, "_load", broken_load)
    result = check_model(str(model_dir), load=True)
    assert not result.ok
    assert "mlx_lm.load failed: ValueError: Model type foo not supported (tiny)" in result.detail
    monkeypatch.setattr(doctor, "_load", lambda path: 2.5)
    assert check_model(str(model_dir), load=True).detail.endswith("loads in 2.5 s")


def test_model_repo_id_in_hf_cache(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "mlx-community/Tiny-4bit"
    absent = check_model(repo)
    assert not absent.ok and absent.fix == f"download it first: hf download {repo}"

    repo_dir = tmp_path / "hub" / "models--mlx-community--Tiny-4bit"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    (repo_dir / "snapshots").mkdir()
    model_dir.rename(repo_dir / "snapshots" / "abc123")
    cached = check_model(repo)
    assert cached.ok, cached
    assert cached.detail.startswith(f"{repo} (cached at {repo_dir / 'snapshots' / 'abc123'})")


def test_hardware_on_macos(fake_bin: FakeBin) -> None:
    fake_bin.add(
        "sysctl",
        '#!/bin/sh\ncase "$2" in\n'
        "hw.memsize) echo 17179869184;;\n"
        "sysctl.proc_translated) echo 1;;\n"
        "*) exit 1;;\nesac\n",
    )
    assert check_hardware(platform="darwin", machine="arm64").ok
    rosetta = check_hardware(platform="darwin", machine="x86_64")
    assert not rosetta.ok and "Rosetta" in rosetta.detail
    assert rosetta.fix is not None and "arm64 Python" in rosetta.fix
    assert check_memory(platform="darwin").detail == "16.0 GiB total"
    assert doctor.total_memory_bytes(platform="linux") is not None


def test_service_state_on_macos(fake_bin: FakeBin, tmp_path: Path) -> None:
    state = tmp_path / "launchctl.out"
    fake_bin.add("launchctl", f'#!/bin/sh\n[ -f "{state}" ] || exit 113\ncat "{state}"\n')
    config = Path("/Users/ann/.config/mlx-provider/config.toml")
    absent = check_service(uid=501, config_path=config, platform="darwin")
    assert not absent.ok and absent.fix == f"mlx-provider install --config {config}"

    state.write_text("gui/501/com.mlx-provider.agent = {\n\tstate = running\n\tpid = 77\n}\n")
    running = check_service(uid=501, platform="darwin")
    assert running.ok and running.detail == "com.mlx-provider.agent running (pid 77)"

    state.write_text("x = {\n\tstate = not running\n\tlast exit code = 1\n}\n")
    crashed = check_service(uid=501, platform="darwin")
    assert not crashed.ok and crashed.fix is not None and "mlx-provider logs" in crashed.fix

    state.write_text("x = {\n\tstate = not running\n\tlast exit code = 0\n}\n")
    assert check_service(uid=501, platform="darwin").ok


def test_log_dir(tmp_path: Path) -> None:
    assert check_log_dir(tmp_path).detail == str(tmp_path)
    assert check_log_dir(tmp_path / "a" / "b").ok
