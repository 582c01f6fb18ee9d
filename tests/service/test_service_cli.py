from __future__ import annotations

import argparse
import asyncio
import json
import plistlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from provider.ops import service_cli
from provider.ops.status_server import StatusServer
from tests.service.helpers import FakeBin, read_calls
from tests.service.test_status_server import sample_status

TOKEN = "prov_tok_cli_31d4"
LABEL = "com.mlx-provider.agent"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mlx-provider")
    service_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("CONFIG", "PROVIDER_TOKEN", "STATUS_PORT", "LOG_FILE", "MODEL"):
        monkeypatch.delenv(f"MLX_PROVIDER_{name}", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.fixture
def mac(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXP_PLATFORM", "darwin")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_subcommands_are_registered() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    service_cli.register(sub)
    expected = {"install", "uninstall", "start", "stop", "restart", "logs", "status", "doctor"}
    assert set(sub.choices) == expected
    args = parser.parse_args(["logs", "-f", "-n", "7"])
    assert (args.follow, args.lines, args.func) == (True, 7, service_cli.cmd_logs)
    args = parser.parse_args(["install", "--dry-run", "--config", "c.toml", "--label", "x.y"])
    assert (args.dry_run, args.config, args.label) == (True, "c.toml", "x.y")


def test_install_dry_run(home: Path, mac: None, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(home / "agent.toml", "drain_timeout_s = 60\n")
    assert run("install", "--dry-run", "--config", str(config)) == 0
    out = capsys.readouterr().out
    plist_path = home / "Library/LaunchAgents" / f"{LABEL}.plist"
    assert f"would write {plist_path}:" in out
    xml = out[out.index("<?xml") : out.index("</plist>") + len("</plist>")]
    plist = plistlib.loads(xml.encode())
    assert plist["ProgramArguments"][-3:] == ["serve", "--config", str(config)]
    assert plist["ExitTimeOut"] == 90
    assert plist["EnvironmentVariables"]["MLX_PROVIDER_LOG_FILE"] == str(
        home / "Library/Logs/mlx-provider/provider.log"
    )
    assert not plist_path.exists()


def test_install_keeps_a_configured_log_file_and_passes_hf_home(
    home: Path, mac: None, fake_bin: FakeBin, monkeypatch: pytest.MonkeyPatch
) -> None:
    launchctl = fake_bin.recorder("launchctl", body='[ "$1" = print ] && exit 113; exit 0')
    monkeypatch.setenv("HF_HOME", "/Volumes/models/hf")
    config = write_config(home / "agent.toml", 'log_file = "/var/tmp/agent.log"\n')
    assert run("install", "--config", str(config), "--label", "org.example.agent") == 0
    plist_path = home / "Library/LaunchAgents/org.example.agent.plist"
    env = plistlib.loads(plist_path.read_bytes())["EnvironmentVariables"]
    assert "MLX_PROVIDER_LOG_FILE" not in env
    assert env["HF_HOME"] == "/Volumes/models/hf"
    assert [call[0] for call in read_calls(launchctl)] == ["print", "bootstrap", "kickstart"]


@pytest.mark.parametrize("argv", [["install"], ["uninstall"], ["start"], ["stop"], ["restart"]])
def test_launchd_commands_off_macos(
    home: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MLXP_PLATFORM", "linux")
    assert run(*argv) == 1
    assert "deploy/mlx-provider.service" in capsys.readouterr().err.splitlines()[0]


def test_stop_sends_sigterm(home: Path, mac: None, fake_bin: FakeBin) -> None:
    launchctl = fake_bin.recorder("launchctl")  # exit 0: loaded
    plist = home / "Library/LaunchAgents" / f"{LABEL}.plist"
    plist.parent.mkdir(parents=True)
    plist.write_bytes(b"")
    assert run("stop") == 0
    uid = read_calls(launchctl)[0][1].split("/")[1]
    assert read_calls(launchctl)[-1] == ["kill", "SIGTERM", f"gui/{uid}/{LABEL}"]


def test_logs_reads_the_configured_file(home: Path, capsys) -> None:
    log_file = home / "agent.log"
    log_file.write_text("a\nb\nc\n")
    config = write_config(home / "agent.toml", f'log_file = "{log_file}"\n')
    assert run("logs", "-n", "2", "--config", str(config)) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["b", "c"]


@pytest.fixture
async def agent_status() -> Any:
    server = StatusServer(lambda: sample_status(), lambda: True, port=0)
    await server.start()
    yield server
    await server.stop()


async def test_status_table_and_json(home: Path, agent_status: StatusServer, capsys) -> None:
    # The handler blocks (urllib), so it runs in a thread while the loop serves.
    port = str(agent_status.port)
    assert await asyncio.to_thread(run, "status", "--port", port) == 0
    out = capsys.readouterr().out
    assert "state             ready (connected)" in out
    assert "provider id       mac-studio-01" in out
    assert await asyncio.to_thread(run, "status", "--port", port, "--json") == 0
    assert json.loads(capsys.readouterr().out) == sample_status()


async def test_status_port_from_config(home: Path, agent_status: StatusServer, capsys) -> None:
    write_config(home / "c.toml", f"status_port = {agent_status.port}\n")
    assert await asyncio.to_thread(run, "status", "--config", str(home / "c.toml")) == 0
    assert "mac-studio-01" in capsys.readouterr().out


def test_status_when_not_running(home: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run("status", "--port", str(port)) == 1
    err = capsys.readouterr().err
    assert f"mlx-provider is not running (nothing listens on 127.0.0.1:{port})" in err
    assert "mlx-provider start" in err


@pytest.fixture
def coordinator() -> Iterator[Server]:
    def handler(ws: ServerConnection) -> None:
        # Speaking first ends doctor's wait for an early close right away.
        ws.send('{"type": "noop"}')
        for _ in ws:
            pass

    def check_auth(connection: ServerConnection, request: Any) -> Any:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return connection.respond(401, "bad token\n")
        return None

    with serve(handler, "127.0.0.1", 0, process_request=check_auth) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server
        server.shutdown()
    thread.join(5)


def test_doctor_passes(
    home: Path, coordinator: Server, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MLXP_PLATFORM", "linux")
    model = home / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text("{}")
    port = coordinator.socket.getsockname()[1]
    config = write_config(
        home / "c.toml",
        f'coordinator_url = "ws://127.0.0.1:{port}/ws"\nmodel = "{model}"\n'
        f'provider_token = "{TOKEN}"\nlog_file = "{home}/logs/agent.log"\n',
    )
    code = run("doctor", "--config", str(config))
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("all good")
    assert "ok    coordinator websocket  handshake accepted" in out
    assert TOKEN not in out


def test_doctor_fails_with_fixes(home: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MLXP_PLATFORM", "linux")
    missing = home / "missing.toml"
    assert run("doctor", "--config", str(missing)) == 1
    out = capsys.readouterr().out
    assert "FAIL  config file" in out
    assert f"fix: create {missing}" in out
    assert "fix: set model in" in out
    assert "problems found" in out
