"""``wss://`` end to end: the stub listens with a certificate from a test CA.

A certificate the provider's trust store accepts connects and serves; an
untrusted issuer, an expired certificate and a certificate for another host
are refused, with a log line that names the cause, and retried with backoff,
never downgraded to ``ws://``. The trust store is the system's, extended
with ``SSL_CERT_FILE`` (OpenSSL reads it at every handshake).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from coordinator_stub.app import CoordinatorStub
from coordinator_stub.config import StubConfig
from tests.session.conftest import PID, provider_config, running, stub_config
from tests.session.scripted_engine import ScriptedEngine

from .tls_ca import DAY, NOW, CertificateAuthority, ServerFiles


class LostConnections(logging.Handler):
    """The agent's ``connection lost`` warnings; ``enough`` is set after ``wanted``."""

    def __init__(self, wanted: int = 2) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.wanted = wanted
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("connection lost"):
            self.messages.append(message)
            if len(self.messages) >= self.wanted:
                self.enough.set()


@pytest.fixture
def lost() -> Iterator[LostConnections]:
    logger = logging.getLogger("mlx_provider.agent")
    handler = LostConnections()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CertificateAuthority:
    """A CA the provider trusts (through ``SSL_CERT_FILE``)."""
    authority = CertificateAuthority(tmp_path / "trusted")
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.cert_file))
    return authority


def tls_stub(server: ServerFiles, **overrides: object) -> StubConfig:
    return stub_config(tls_cert=str(server.cert), tls_key=str(server.key), **overrides)


async def test_trusted_certificate_connects_and_serves(ca: CertificateAuthority) -> None:
    async with CoordinatorStub(tls_stub(ca.issue(hosts=("127.0.0.1",)))) as stub:
        assert stub.ws_url.startswith("wss://127.0.0.1:")
        async with running(provider_config(stub), ScriptedEngine(tokens=3)) as run:
            await stub.wait_provider_state(PID, "ready", timeout=20)
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{stub.http_url}/v1/chat/completions", json=body) as response,
            ):
                assert response.status == 200
                assert (await response.json())["usage"]["completion_tokens"] == 3
            session = stub.session(PID)
            assert session is not None
            tls = session.conn.transport.get_extra_info("ssl_object")
            assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
            assert run.agent.reconnects == []


def _untrusted(ca: CertificateAuthority, tmp_path: Path) -> ServerFiles:
    return CertificateAuthority(tmp_path / "other", name="unknown CA").issue()


def _expired(ca: CertificateAuthority, tmp_path: Path) -> ServerFiles:
    return ca.issue(not_before=NOW - 10 * DAY, not_after=NOW - DAY)


def _wrong_host(ca: CertificateAuthority, tmp_path: Path) -> ServerFiles:
    return ca.issue(hosts=("coordinator.example",))


@pytest.mark.parametrize(
    ("make_cert", "cause"),
    [
        (_untrusted, "is not signed by a CA this machine trusts"),
        (_expired, "has expired"),
        (_wrong_host, "is not for 127.0.0.1"),
    ],
    ids=["untrusted_ca", "expired", "wrong_host"],
)
async def test_bad_certificate_is_refused_naming_the_cause(
    ca: CertificateAuthority,
    tmp_path: Path,
    lost: LostConnections,
    make_cert: object,
    cause: str,
) -> None:
    server = make_cert(ca, tmp_path)  # type: ignore[operator]
    async with CoordinatorStub(tls_stub(server)) as stub:
        async with running(provider_config(stub), ScriptedEngine()) as run:
            await asyncio.wait_for(lost.enough.wait(), 20)
            assert not run.task.done()  # it keeps trying, with backoff
            reconnects = list(run.agent.reconnects)
        # Nothing got past the TLS handshake: no upgrade, no hello.
        assert stub.frames_received() == [] and stub.providers() == {}
    assert len(reconnects) >= 2
    for entry in reconnects:
        assert entry["cause"] == "tls", entry
        assert entry["detail"].startswith("TLS with 127.0.0.1 refused: ")
        assert cause in entry["detail"], entry
    assert all(cause in message for message in lost.messages), lost.messages


async def test_wss_to_a_plain_endpoint_is_refused_not_downgraded(
    ca: CertificateAuthority, lost: LostConnections
) -> None:
    async with CoordinatorStub(stub_config()) as stub:
        assert stub.ws_url.startswith("ws://")
        url = stub.ws_url.replace("ws://", "wss://", 1)
        async with running(provider_config(url), ScriptedEngine()) as run:
            await asyncio.wait_for(lost.enough.wait(), 20)
            reconnects = list(run.agent.reconnects)
        # The stub takes any token: one plain-text attempt would have
        # registered. It saw no hello, so every attempt was TLS.
        assert stub.frames_received() == [] and stub.providers() == {}
    assert len(reconnects) >= 2
    # The stub resets the connection on a ClientHello it cannot parse.
    assert all(e["cause"] in ("tls", "refused") for e in reconnects), reconnects


async def test_plain_http_answer_to_wss_names_the_cause(
    ca: CertificateAuthority, lost: LostConnections
) -> None:
    async with CoordinatorStub(stub_config()) as stub:
        # The buyer API answers the ClientHello with a plain-text HTTP 400.
        url = f"wss://127.0.0.1:{stub.http_port}/ws/provider"
        async with running(provider_config(url), ScriptedEngine()) as run:
            await asyncio.wait_for(lost.enough.wait(), 20)
            reconnects = list(run.agent.reconnects)
    for entry in reconnects:
        assert entry["cause"] == "tls", entry
        assert "did not answer in TLS" in entry["detail"], entry


async def test_doctor_names_the_certificate_problem(ca: CertificateAuthority) -> None:
    from provider.ops import doctor

    async with CoordinatorStub(tls_stub(_expired(ca, Path()))) as stub:
        tcp, ws = await doctor.check_coordinator(stub.ws_url, "tok_0123456789abcdef", settle=0)
    assert tcp.ok and not ws.ok
    assert ws.detail.startswith("TLS with 127.0.0.1 refused: ")
    assert "has expired" in ws.detail


def test_stub_tls_settings_from_the_command_line(ca: CertificateAuthority) -> None:
    from coordinator_stub.cli import build_parser, config_from_args

    server = ca.issue()
    args = build_parser().parse_args(["--tls-cert", str(server.cert), "--tls-key", str(server.key)])
    config = config_from_args(args)
    assert (config.tls_cert, config.tls_key) == (str(server.cert), str(server.key))
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        StubConfig(tls_cert=str(server.cert))
