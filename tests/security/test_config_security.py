"""Configuration that would expose the token or the status page is refused.

- ``coordinator_url``: plain ``ws://`` only to loopback, never credentials;
  what the config accepts is safe as websockets itself parses it.
- A config file holding the token must be private (0600).
- The status endpoint binds loopback only; so does the stub by default.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from coordinator_stub.app import CoordinatorStub
from coordinator_stub.cli import build_parser as stub_parser
from coordinator_stub.config import StubConfig
from provider.config import (
    Config,
    ConfigError,
    check_config,
    check_coordinator_url,
    is_loopback,
    load_config,
    persist_keys,
)
from provider.ops.status_server import StatusServer

TOKEN = "ptok_secret_Q2w3E4r5T6y7"
FIXED = {"deadline": None, "derandomize": True, "database": None}


def load(url: str) -> Config:
    config, _ = load_config(None, overrides={"coordinator_url": url, "model": "m"}, environ={})
    return config


# --------------------------------------------------------------------------
# coordinator_url

REFUSED_URLS = [
    "ws://coordinator.example.com/ws/provider",
    "ws://10.0.0.7:8080/ws/provider",
    "ws://192.168.1.20/ws/provider",
    "ws://[2001:db8::1]/ws/provider",
    "ws://0.0.0.0/ws/provider",
    "ws://localhost.evil.example/ws/provider",
    "ws://127.0.0.1.nip.io/ws/provider",
    "ws://127.1/ws/provider",
    "ws://2130706433/ws/provider",
    "WS://coordinator.example.com/ws/provider",
    "wss://user:pass@coordinator.example.com/ws/provider",
    "wss://user@coordinator.example.com/ws/provider",
    "wss://:pass@coordinator.example.com/ws/provider",
    "ws://user:pass@127.0.0.1:9000/ws/provider",
    "wss://127.0.0.1@evil.example/ws/provider",
    "ws://evil.example\\@127.0.0.1/ws/provider",
    "http://coordinator.example.com/ws/provider",
    "https://coordinator.example.com/ws/provider",
    "ws:///ws/provider",
    "coordinator.example.com/ws/provider",
]
ACCEPTED_URLS = [
    "ws://127.0.0.1:8080/ws/provider",
    "ws://127.0.0.2/ws/provider",
    "ws://localhost:9/ws/provider",
    "ws://[::1]:9/ws/provider",
    "wss://coordinator.example.com/ws/provider",
    "WSS://coordinator.example.com:8443/ws/provider",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_unsafe_coordinator_url_refused_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^coordinator_url: ") as caught:
        load(url)
    if "pass@" in url:
        assert "pass" not in str(caught.value)


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_unsafe_coordinator_url_refused_from_the_environment(url: str) -> None:
    with pytest.raises(ConfigError, match="coordinator_url"):
        load_config(None, overrides={"model": "m"}, environ={"MLX_PROVIDER_COORDINATOR_URL": url})


def test_plain_ws_refusal_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigError, match=r"use wss://coordinator\.example\.com"):
        load("ws://coordinator.example.com/ws/provider")
    with pytest.raises(ConfigError, match="use provider_token"):
        load("wss://user:pass@coordinator.example.com/ws/provider")


@pytest.mark.parametrize("url", ACCEPTED_URLS)
def test_safe_coordinator_url_accepted(url: str) -> None:
    assert load(url).coordinator_url == url


HOSTS = st.sampled_from(
    [
        "127.0.0.1", "127.0.0.9", "localhost", "LOCALHOST", "[::1]", "[::ffff:127.0.0.1]",
        "0.0.0.0", "[::]", "10.1.2.3", "coordinator.example.com", "localhost.example.com",
        "127.0.0.1.example.com", "127.1", "0x7f.0.0.1", "2130706433", "[fe80::1%25lo]", "",
    ]
)  # fmt: skip


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["ws", "wss", "WS", "Wss", "http", "ftp", ""]))
    userinfo = draw(st.sampled_from(["", "", "user@", "user:pw@", ":pw@", "@", "a%40b:c@"]))
    host = draw(HOSTS)
    port = draw(st.sampled_from(["", ":1", ":443", ":65535", ":0", ":x"]))
    path = draw(st.sampled_from(["", "/", "/ws/provider", "/ws?q=1", "/#frag", "\\@evil.example/"]))
    sep = draw(st.sampled_from(["://", "://", ":/", ":"]))
    return f"{scheme}{sep}{userinfo}{host}{port}{path}"


@settings(max_examples=400, **FIXED)
@given(urls())
def test_accepted_url_is_safe_as_websockets_parses_it(url: str) -> None:
    try:
        check_coordinator_url(url)
    except ConfigError as exc:
        assert str(exc).startswith("coordinator_url: ")
        return
    try:
        parsed = parse_uri(url)
    except (InvalidURI, ValueError):
        return  # websockets will not connect anywhere (see the bad-port test)
    assert parsed.user_info is None, url
    assert parsed.secure or is_loopback(parsed.host), url


@pytest.mark.parametrize(
    "url", ["https://user:hunter2@coord.example/ws", "ws://user:hunter2@/ws/provider"]
)
def test_refusal_never_echoes_url_credentials(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_coordinator_url(url)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("url", ["wss://coord.example:x/ws", "ws://127.0.0.1:99999/ws"])
def test_url_with_bad_port_refused_by_config(url: str) -> None:
    with pytest.raises(ConfigError, match="coordinator_url"):
        check_coordinator_url(url)


# --------------------------------------------------------------------------
# Config file permissions

needs_posix = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def write_config(path: Path, mode: int, *, token: bool = True) -> Path:
    lines = ['coordinator_url = "ws://127.0.0.1:9/ws/provider"', 'model = "m"']
    if token:
        lines.append(f'provider_token = "{TOKEN}"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(mode)
    return path


@needs_posix
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o777, 0o610])
def test_config_with_token_readable_by_others_refused_with_chmod_fix(
    tmp_path: Path, mode: int
) -> None:
    path = write_config(tmp_path / "config.toml", mode)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert f"chmod 600 {path}" in message and f"{mode:04o}" in message
    assert TOKEN not in message


@needs_posix
@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_config_with_token_accepted(tmp_path: Path, mode: int) -> None:
    path = write_config(tmp_path / "config.toml", mode)
    config, _ = load_config(path, environ={})
    assert config.provider_token == TOKEN


@needs_posix
def test_config_without_token_may_be_world_readable(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", 0o644, token=False)
    config, _ = load_config(path, environ={})
    assert config.provider_token is None


@needs_posix
def test_token_written_back_makes_the_file_private(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", 0o644, token=False)
    persist_keys(path, {"provider_token": TOKEN})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config, _ = load_config(path, environ={})
    assert config.provider_token == TOKEN


@needs_posix
def test_default_config_path_is_checked_too(tmp_path: Path) -> None:
    # $HOME is a temporary directory (tests/conftest.py).
    path = Path("~/.config/mlx-provider/config.toml").expanduser()
    path.parent.mkdir(parents=True)
    write_config(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(None, environ={})


# --------------------------------------------------------------------------
# Loopback only: the status endpoint and the stub

NOT_LOOPBACK = ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "2001:db8::1", "example.com",
                "localhost.example.com", "127.0.0.1.example.com", ""]  # fmt: skip
LOOPBACK = ["127.0.0.1", "127.0.0.53", "::1", "localhost"]


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_non_loopback_status_host_refused_by_config(host: str) -> None:
    config = msgspec.convert({"status_host": host}, Config)
    with pytest.raises(ConfigError, match=r"^status_host: "):
        check_config(config)
    with pytest.raises(ConfigError, match="status_host"):
        load_config(None, overrides={"status_host": host}, environ={}, require=())


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_non_loopback_status_host_refused_by_status_server(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        StatusServer(dict, lambda: True, host=host, port=0)


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_status_host_accepted_by_both(host: str) -> None:
    check_config(msgspec.convert({"status_host": host}, Config))
    StatusServer(dict, lambda: True, host=host, port=0)


def test_bracketed_ipv6_status_host_accepted_by_both() -> None:
    check_config(msgspec.convert({"status_host": "[::1]"}, Config))
    StatusServer(dict, lambda: True, host="[::1]", port=0)


def test_status_server_defaults_to_loopback_and_binds_only_there() -> None:
    assert Config().status_host == "127.0.0.1"
    assert StatusServer(dict, lambda: True).host == "127.0.0.1"


async def test_status_server_listens_on_loopback_only() -> None:
    async with StatusServer(dict, lambda: True, port=0) as server:
        assert server._runner is not None
        addresses = server._runner.addresses
        assert addresses and all(is_loopback(a[0]) for a in addresses), addresses
        # Not reachable on another interface of this machine, if it has one.
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, server.port), timeout=1).close()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if is_loopback(address) or address == "0.0.0.0" else address


async def test_stub_binds_loopback_by_default() -> None:
    assert StubConfig().host == "127.0.0.1"
    assert stub_parser().parse_args([]).host == "127.0.0.1"
    async with CoordinatorStub() as stub:
        assert stub.ws_url.startswith("ws://127.0.0.1:")
        assert stub.http_url.startswith("http://127.0.0.1:")
        assert stub.ws._server is not None and stub.http._runner is not None
        ws_addresses = [s.getsockname()[0] for s in stub.ws._server.sockets]
        http_addresses = [a[0] for a in stub.http._runner.addresses]
        assert ws_addresses and http_addresses
        assert set(ws_addresses) | set(http_addresses) == {"127.0.0.1"}
