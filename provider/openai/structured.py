"""Structured output: ``response_format`` schemas checked, turned into grammars, outputs judged.

Pure (no I/O). The engine constrains decoding with the grammar
:func:`response_grammar` returns (llguidance's Lark dialect, with ``%json``
for JSON Schema), so the output follows the schema token by token. What can
still go wrong is that the output ends before the JSON does (``max_tokens``,
a cancel): :func:`judge_output` finds that, and also re-checks the schema
with ``jsonschema``, so a delivered answer that breaks the schema can never
pass as a success.

The end statuses are the coordinator's own provider's:
``malformed_json_response`` (not JSON) and ``json_schema_validation_failed``
(JSON, but not what the schema allows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

#: Largest schema (bytes of its compact JSON) a request may carry.
MAX_SCHEMA_BYTES: Final = 64 * 1024

#: The schema of ``response_format: json_object``: any JSON object.
JSON_OBJECT_SCHEMA: Final[dict[str, Any]] = {"type": "object"}

#: How constrained JSON is written: as ``json.dumps`` writes it (the spacing
#: models learned), with no free whitespace, so a weak model cannot wander
#: off into endless blank lines; unsupported keywords are errors (not lenient).
JSON_STYLE: Final[dict[str, Any]] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}


def check_schema(schema: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the problem when ``schema`` cannot be enforced.

    Checks, in order: its size, that it is a valid JSON Schema (Draft 2020-12
    meta-schema, via ``jsonschema``) and that llguidance compiles it into a
    grammar (an unsupported keyword is an error, not silently ignored).
    """
    if schema is None:
        return
    import jsonschema
    import llguidance

    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"`schema` is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.absolute_path) or " (the root)"
        raise ValueError(f"`schema` is not a valid JSON Schema at {where}: {exc.message}") from None
    error = llguidance.LLMatcher.validate_grammar(schema_grammar(schema))
    if error:
        raise ValueError(f"`schema` cannot be enforced: {error}")


def json_rule(schema: dict[str, Any]) -> str:
    """An llguidance Lark expression for one JSON document matching ``schema``."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


def schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of JSON documents matching ``schema``."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark("start: " + json_rule(schema))


def json_schema_of(request: Any) -> dict[str, Any] | None:
    """The schema ``request.response_format`` asks for, or None for plain text.

    ``json_schema`` without a ``schema`` means any JSON value (``{}``).
    """
    mode = request.json_mode()
    if mode == "off":
        return None
    if mode == "object":
        return JSON_OBJECT_SCHEMA
    return request.response_format.json_schema.schema or {}


Status = Literal["malformed_json_response", "json_schema_validation_failed"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why delivered content fails its ``response_format``; ``message`` is buyer-facing."""

    status: Status
    message: str
    retryable: bool = False


def judge_output(text: str, schema: dict[str, Any], *, finish_reason: str | None) -> Verdict | None:
    """None when ``text`` is JSON matching ``schema``, else what is wrong with it."""
    import jsonschema

    if not text.strip():
        return Verdict(
            "malformed_json_response",
            "the model produced no JSON (empty content); check the prompt and `max_tokens`",
        )
    try:
        value = json.loads(text)
    except ValueError as exc:
        if finish_reason == "length":
            return Verdict(
                "malformed_json_response",
                "the JSON output was cut off by the token limit before it was complete; "
                "raise `max_tokens` (or `max_completion_tokens`)",
            )
        return Verdict(
            "malformed_json_response", f"the output is not valid JSON: {exc}", retryable=True
        )
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(value)
    )
    if error is not None:
        return Verdict(
            "json_schema_validation_failed",
            f"the output does not match the schema at {error.json_path}: {error.message}",
            retryable=True,
        )
    return None
