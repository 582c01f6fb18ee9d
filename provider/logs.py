"""Logging for the agent: JSON lines for machines, plain lines for people.

:func:`setup_logging` configures the ``mlx_provider`` logger; modules log
through children of it (``mlx_provider.session``, ``mlx_provider.engine``...),
see :func:`get_logger`. Context travels in ``extra=``::

    log.info("request done", extra={"request_id": rid, "cause": "complete"})

Every handler it installs redacts the configured secrets (the provider token)
and ``Bearer <credential>`` from the message, its arguments, the ``extra``
fields and exception text, so a token can only reach a log as ``***``: in
every spelling a line can hold it (see :func:`secret_forms`: plain, inside a
``repr()`` or ``ascii()``, JSON-escaped). A secret shorter than
:data:`MIN_SECRET_LENGTH` is refused: it would be found inside ordinary
words and mangle every line.
"""

from __future__ import annotations

import json as _json
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "LOGGER_NAME",
    "LOG_FILE_NAME",
    "MIN_SECRET_LENGTH",
    "JsonFormatter",
    "RedactingFilter",
    "default_log_dir",
    "get_logger",
    "secret_forms",
    "setup_logging",
]

LOGGER_NAME = "mlx_provider"
#: Name of the agent's own (rotated) log file inside the log directory.
LOG_FILE_NAME = "provider.log"

REDACTED = "***"
#: Shortest secret :class:`RedactingFilter` accepts. Redaction replaces every
#: occurrence, so a token like ``"ok"`` would turn ``"broken"`` into
#: ``"br***en"`` in every line; the coordinator issues 64 hex characters.
MIN_SECRET_LENGTH = 16

# Attributes every LogRecord has; anything else on a record came from extra=.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
# Marks the handlers setup_logging owns, so a second call replaces them.
_OWNED = "_mlx_provider_handler"


def get_logger(name: str = "") -> logging.Logger:
    """The logger ``mlx_provider.<name>`` (``mlx_provider`` itself for ``""``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def default_log_dir(*, platform: str | None = None, home: Path | None = None) -> Path:
    """Where the agent's logs go unless configured otherwise.

    ``~/Library/Logs/mlx-provider`` on macOS (Console.app shows it),
    ``$XDG_STATE_HOME/mlx-provider`` (default ``~/.local/state/mlx-provider``)
    elsewhere.
    """
    platform = platform or sys.platform
    home = home or Path.home()
    if platform == "darwin":
        return home / "Library" / "Logs" / "mlx-provider"
    state = os.environ.get("XDG_STATE_HOME")
    return (Path(state) if state else home / ".local" / "state") / "mlx-provider"


#: The filter installed by the last setup_logging(), for add_secret().
_redactors: list[RedactingFilter] = []


def add_secret(secret: str) -> None:
    """Redact ``secret`` from now on too (a token the coordinator assigned).

    Raises :exc:`ValueError` for a secret shorter than :data:`MIN_SECRET_LENGTH`.
    """
    for redactor in _redactors:
        redactor.add(secret)


def _escape_chars(text: str, escape: Callable[[str], str], quote: str) -> str:
    """``text`` as it appears inside ``escape(whole)`` quoted with ``quote``.

    ``repr`` and ``ascii`` escape each character on its own; only the quote
    character depends on the whole string (Python picks ``"`` when the
    string holds a ``'`` and no ``"``), hence one form per quote.
    """
    out = []
    for char in text:
        body = escape(char)[1:-1]
        out.append("\\" + char if char == quote else body)
    return "".join(out)


def _bytes_repr_body(data: bytes, quote: str) -> str:
    out = []
    for byte in data:
        char = chr(byte)
        out.append("\\" + char if char == quote else repr(bytes([byte]))[2:-1])
    return "".join(out)


def secret_forms(secret: str) -> set[str]:
    """Every spelling of ``secret`` that a log line can hold.

    Plain; inside ``repr()`` and ``ascii()`` of a longer string, for either
    quote character; JSON-escaped (``ensure_ascii`` on and off, which is also
    what msgspec writes); the ``repr()`` of that JSON (a raw frame logged
    with ``%r``); and the ``repr()`` of its UTF-8 bytes.
    """
    forms = {secret}
    json_forms = {_json.dumps(secret)[1:-1], _json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= json_forms
    for quote in "'\"":
        for text in (secret, *json_forms):
            forms.add(_escape_chars(text, repr, quote))
            forms.add(_escape_chars(text, ascii, quote))
        try:
            forms.add(_bytes_repr_body(secret.encode(), quote))
        except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form
            pass
    return forms


class RedactingFilter(logging.Filter):
    """Replace secrets and ``Bearer`` credentials in a record with ``***``.

    It rewrites the record in place (message with its arguments merged,
    ``extra`` fields, exception and stack text), so every handler after it
    sees the redacted record. It never drops a record.

    Each secret is replaced in every form :func:`secret_forms` lists, again
    and again until none is left (a replacement can join the text around it
    into a new occurrence). Empty secrets are ignored; one shorter than
    :data:`MIN_SECRET_LENGTH` raises :exc:`ValueError`.
    """

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self._pattern: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Redact ``secret`` too (nothing for an empty or a known one)."""
        if not secret or secret in self.secrets:
            return
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"a secret of {len(secret)} characters cannot be redacted from logs without "
                f"mangling them; at least {MIN_SECRET_LENGTH} are needed"
            )
        self.secrets.append(secret)
        forms = {form for s in self.secrets for form in secret_forms(s)}
        # Longest first, so a form containing another is replaced whole.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered)))

    def redact(self, text: str) -> str:
        if self._pattern is not None:
            # Every pass shortens the text (a form is longer than ***): it ends.
            while (redacted := self._pattern.sub(REDACTED, text)) != text:
                text = redacted
        return _BEARER.sub(rf"\1 {REDACTED}", text)

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self._redact_value(k): self._redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._redact_value(v) for v in value]
        # Formatters render other objects with str(); check what that would show.
        text = str(value)
        redacted = self.redact(text)
        return value if redacted == text else redacted

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        # The cached text now stands for the exception; dropping exc_info keeps
        # any later formatter from rendering the unredacted traceback again.
        record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in _extra_fields(record).items():
            setattr(record, key, self._redact_value(value))
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k[0] != "_"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record.

    Keys: ``ts`` (ISO-8601, UTC, milliseconds), ``level`` (lower case),
    ``logger``, ``msg``, then every ``extra`` field, then ``exc`` (the
    traceback) and ``stack`` when present. Values JSON cannot hold are
    written with ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return _json.dumps(entry, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL logger: message key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = _extra_fields(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


def setup_logging(
    *,
    # What is logged.
    level: str | int = "info",
    secrets: Sequence[str] = (),
    # Where it goes.
    log_file: Path | None = None,
    max_bytes: int = 10 * 1024 * 1024,
    backups: int = 5,
    stream: TextIO | None = None,
    # How it looks on the stream.
    json: bool | None = None,
    # Other loggers routed through the same handlers, at WARNING.
    libraries: Sequence[str] = ("websockets", "aiohttp", "asyncio"),
) -> logging.Logger:
    """Configure the ``mlx_provider`` logger and return it.

    ``level`` is a name (``"debug"``, ``"info"``...) or a :mod:`logging` level.
    ``secrets`` are strings that must never be written (the provider token);
    they come out as ``***``, as does anything after ``Bearer``.

    With ``log_file``, records go to that file as JSON lines, rotated when it
    would exceed ``max_bytes`` (``backups`` old files are kept: ``.1`` ...).
    Its directory is created.

    ``stream`` (default: :data:`sys.stderr`) also gets the records, except
    when there is a ``log_file`` and ``stream`` is not a TTY: under launchd or
    systemd the stream is itself a file that nothing rotates, so it is kept
    for crashes that happen before logging is set up. ``json=None`` writes
    JSON lines to a non-TTY stream and readable lines to a TTY;
    ``True``/``False`` force one or the other.

    The ``libraries`` loggers get the same handlers at level WARNING, so
    their warnings are formatted and redacted too (their debug output, such
    as websockets' handshake headers, stays off).

    Calling it again replaces the handlers of the previous call. These
    loggers do not propagate to the root logger, so a library's
    ``basicConfig`` does not print every line twice.
    """
    stream = stream if stream is not None else sys.stderr
    logger = logging.getLogger(LOGGER_NAME)
    others = [logging.getLogger(name) for name in libraries]
    for configured in (logger, *others):
        for handler in [h for h in configured.handlers if getattr(h, _OWNED, False)]:
            configured.removeHandler(handler)
            handler.close()

    redactor = RedactingFilter(secrets)
    _redactors[:] = [redactor]
    is_tty = _isatty(stream)
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file = Path(log_file).expanduser()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        file_handler.setFormatter(JsonFormatter())
        handlers.append(file_handler)
    if log_file is None or is_tty:
        stream_handler = logging.StreamHandler(stream)
        use_json = (not is_tty) if json is None else json
        stream_handler.setFormatter(JsonFormatter() if use_json else HumanFormatter())
        handlers.append(stream_handler)

    for handler in handlers:
        handler.addFilter(redactor)
        setattr(handler, _OWNED, True)
        for configured in (logger, *others):
            configured.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    for configured in (logger, *others):
        configured.propagate = False
    for other in others:
        other.setLevel(logging.WARNING)
    return logger


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
