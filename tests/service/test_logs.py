from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provider.logs import (
    LOGGER_NAME,
    MIN_SECRET_LENGTH,
    RedactingFilter,
    add_secret,
    default_log_dir,
    get_logger,
    secret_forms,
    setup_logging,
)

TOKEN = "tok_live_5f3a9c0d2e7b41"
FIXED = {"deadline": None, "derandomize": True, "database": None}


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_shape_and_extra_fields() -> None:
    out = io.StringIO()
    setup_logging(stream=out)
    get_logger("session").info(
        "connected to %s", "wss://c.example", extra={"provider_id": "p-1", "request_id": "r-9"}
    )
    [entry] = lines(out)
    assert list(entry)[:4] == ["ts", "level", "logger", "msg"]
    assert entry["level"] == "info"
    assert entry["logger"] == "mlx_provider.session"
    assert entry["msg"] == "connected to wss://c.example"
    assert entry["provider_id"] == "p-1"
    assert entry["request_id"] == "r-9"
    assert datetime.fromisoformat(entry["ts"]).tzinfo is not None


def test_level_filters_and_exception_is_a_field() -> None:
    out = io.StringIO()
    setup_logging(stream=out, level="warning")
    log = get_logger("engine")
    log.info("not shown")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("generation failed", extra={"cause": "oom"})
    [entry] = lines(out)
    assert entry["level"] == "error"
    assert entry["cause"] == "oom"
    assert "RuntimeError: boom" in entry["exc"]


def test_tty_gets_human_lines_and_json_can_be_forced() -> None:
    tty = TTY()
    setup_logging(stream=tty)
    get_logger("x").warning("hello", extra={"request_id": "r-1"})
    text = tty.getvalue()
    assert "WARNING" in text and "mlx_provider.x: hello request_id=r-1" in text
    with_json = TTY()
    setup_logging(stream=with_json, json=True)
    get_logger("x").warning("hello")
    assert lines(with_json)[0]["msg"] == "hello"


def test_idempotent() -> None:
    out = io.StringIO()
    setup_logging(stream=out)
    setup_logging(stream=out)
    get_logger().info("once")
    assert len(out.getvalue().splitlines()) == 1
    assert len(logging.getLogger(LOGGER_NAME).handlers) == 1


def test_token_never_written(tmp_path: Path) -> None:
    out = TTY()
    log_file = tmp_path / "logs" / "provider.log"
    setup_logging(stream=out, log_file=log_file, secrets=[TOKEN, ""], json=True)
    log = get_logger("session")
    log.info(f"token is {TOKEN}")
    log.info("args %s", TOKEN)
    log.info("header", extra={"headers": {"Authorization": f"Bearer {TOKEN}"}, "t": TOKEN})
    log.info("sent Authorization: Bearer abc.def-ghi and more")
    try:
        raise ValueError(f"auth failed for {TOKEN}")
    except ValueError:
        log.exception("handshake failed", extra={"cause": RuntimeError(TOKEN)})

    for text in (out.getvalue(), log_file.read_text()):
        assert TOKEN not in text
        assert "abc.def-ghi" not in text
        entries = [json.loads(line) for line in text.splitlines()]
        assert entries[0]["msg"] == "token is ***"
        assert entries[1]["msg"] == "args ***"
        assert entries[2]["headers"] == {"Authorization": "Bearer ***"}
        assert entries[2]["t"] == "***"
        assert entries[3]["msg"] == "sent Authorization: Bearer *** and more"
        assert "ValueError: auth failed for ***" in entries[4]["exc"]
        assert entries[4]["cause"] == "***"


def test_file_is_json_and_stream_is_quiet_when_not_a_tty(tmp_path: Path) -> None:
    out = io.StringIO()
    log_file = tmp_path / "provider.log"
    setup_logging(stream=out, log_file=log_file)
    get_logger().info("to the file")
    assert out.getvalue() == ""
    assert json.loads(log_file.read_text())["msg"] == "to the file"


def test_rotation_at_max_bytes(tmp_path: Path) -> None:
    log_file = tmp_path / "provider.log"
    setup_logging(stream=io.StringIO(), log_file=log_file, max_bytes=2000, backups=2)
    log = get_logger()
    for i in range(100):
        log.info("line %03d %s", i, "x" * 50)
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["provider.log", "provider.log.1", "provider.log.2"]
    for name in rotated:
        assert (tmp_path / name).stat().st_size <= 2000
    last = json.loads(log_file.read_text().splitlines()[-1])
    assert last["msg"].startswith("line 099")


def test_default_log_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_log_dir(platform="darwin", home=tmp_path) == (
        tmp_path / "Library/Logs/mlx-provider"
    )
    assert default_log_dir(platform="linux", home=tmp_path) == (
        tmp_path / ".local/state/mlx-provider"
    )


def test_library_warnings_are_formatted_and_redacted() -> None:
    out = io.StringIO()
    setup_logging(stream=out, secrets=[TOKEN])
    setup_logging(stream=out, secrets=[TOKEN])
    logging.getLogger("websockets.client").debug("> Authorization: Bearer %s", TOKEN)
    logging.getLogger("websockets.client").warning("handshake with %s failed", TOKEN)
    [entry] = lines(out)
    assert entry["logger"] == "websockets.client"
    assert entry["msg"] == "handshake with *** failed"


# --------------------------------------------------------------------------
# Redaction: short secrets refused, every spelling of a token redacted


def test_short_secrets_are_refused_with_the_reason() -> None:
    for short in ("t", "ok", "x" * (MIN_SECRET_LENGTH - 1)):
        with pytest.raises(ValueError, match=f"at least {MIN_SECRET_LENGTH}"):
            setup_logging(stream=io.StringIO(), secrets=[short])
        with pytest.raises(ValueError, match="mangling"):
            RedactingFilter([short])
    setup_logging(stream=io.StringIO(), secrets=[TOKEN])
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET_LENGTH}"):
        add_secret("ok")


def test_a_word_is_not_mangled_by_redaction() -> None:
    out = io.StringIO()
    setup_logging(stream=out, secrets=[TOKEN])
    get_logger().info("request completed ok")
    assert lines(out)[0]["msg"] == "request completed ok"


def test_escaped_spellings_are_redacted() -> None:
    # A backslash, a quote and a non-ASCII letter: repr, ascii and JSON each
    # spell this token differently from its plain text.
    token = 'tok\\en"with\'q\u00e9_0123456789'
    out = TTY()
    setup_logging(stream=out, secrets=[token], json=True)
    log = get_logger("session")
    log.info("repr %r", token)
    log.info("ascii %s", ascii(token))
    log.info("json %s", json.dumps({"t": token}))
    log.info("json utf-8 %s", json.dumps({"t": token}, ensure_ascii=False))
    log.info("frame %r", json.dumps({"t": token}))
    log.info("bytes %r", token.encode())
    log.info("list %s", [token])
    text = out.getvalue()
    for form in secret_forms(token):
        assert form not in text
    messages = [entry["msg"] for entry in lines(out)]
    assert all("***" in m for m in messages), messages
    assert "tok" not in "".join(messages)


def _leaks(token: str, text: str) -> list[str]:
    return [form for form in secret_forms(token) if form in text]


@settings(max_examples=300, **FIXED)
@given(
    token=st.text(min_size=MIN_SECRET_LENGTH, max_size=40),
    before=st.text(max_size=12),
    after=st.text(max_size=12),
)
def test_no_spelling_of_any_token_reaches_a_line(token: str, before: str, after: str) -> None:
    around = f"{before}{token}{after}"
    for json_lines in (True, False):
        out = TTY()
        setup_logging(stream=out, secrets=[token], json=json_lines)
        log = get_logger("prop")
        log.info("%s", around)
        log.info("%r", around)
        log.info("%s", ascii(around))
        log.info("%s", json.dumps(around))
        log.info("%s", json.dumps(around, ensure_ascii=False))
        log.info("%r", json.dumps({"frame": around}))
        log.info("%r", around.encode(errors="replace"))
        log.info("extra", extra={"value": around, "nested": {"k": [around]}})
        try:
            raise ValueError(around)
        except ValueError:
            log.exception("failed")
        text = out.getvalue()
        assert _leaks(token, text) == []
        if json_lines:
            # split("\n"), not splitlines(): U+2028 and U+0085 stay inside a JSON line.
            for line in filter(None, text.split("\n")):
                assert _leaks(token, json.dumps(json.loads(line), ensure_ascii=False)) == []
