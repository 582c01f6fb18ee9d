"""The OpenAI chat-completions request body: decoding, limits and the field rule, pure.

A buyer's body travels unchanged inside ``inference_request.body``.
:func:`decode_chat_request` decodes it once, at the edge, into
:class:`ChatCompletionRequest`; a body this provider cannot serve as asked
raises :class:`BadRequest` whose message names the field.

The field rule (:data:`FIELDS`, documented in ``docs/openai.md``): every
field of OpenAI's chat-completions request is either honoured, accepted
because by its definition it has no effect on the answer (identifiers, cache
hints), or refused by name, for all values or for the values this provider
cannot honour. An unknown field is refused by name, as OpenAI's own API does:
a buyer who sends a field expects it to do something, and a 200 that ignored
it would be a wrong answer. ``null`` means the field is absent, everywhere.
Model-dependent checks (a template without tools, token ids in
``logit_bias``, a thinking model for ``reasoning_effort``) happen in the
engine, before generation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from provider.decoding import DECODE_ERRORS, describe

#: Largest chat completion body (bytes) inside an ``inference_request``.
MAX_BODY_BYTES: Final = 2 * 1024 * 1024
MAX_MESSAGES: Final = 2048
MAX_STOP: Final = 4
MAX_STOP_BYTES: Final = 256
MAX_TOKENS_LIMIT: Final = 1 << 20
MAX_TOOLS: Final = 128
MAX_TOP_LOGPROBS: Final = 20
MAX_LOGIT_BIAS: Final = 1024
MAX_METADATA: Final = 16

Str64 = Annotated[str, Meta(max_length=64)]
Str512 = Annotated[str, Meta(max_length=512)]
FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
JsonObject = dict[str, Any]


class _Strict(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Every request struct refuses fields it does not know (see the module docstring)."""


# -- messages -------------------------------------------------------------------


class ContentPart(_Strict, kw_only=True):
    """One part of a message's content: ``text`` (or ``refusal``); media are refused."""

    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    #: An OpenAI cache hint; this provider's prompt cache needs none.
    prompt_cache_breakpoint: Any = None

    def __post_init__(self) -> None:
        if self.type == "text":
            if self.text is None:
                raise ValueError("Object missing required field `text`")
        elif self.type == "refusal":
            if self.refusal is None:
                raise ValueError("Object missing required field `refusal`")
        elif self.type in ("image_url", "input_audio", "file"):
            raise ValueError(
                f"content part type `{self.type}` is not supported: this provider serves "
                "text-only models"
            )
        else:
            raise ValueError(f"Invalid value {self.type!r} for content part `type`")

    def plain(self) -> str:
        return self.text if self.type == "text" else (self.refusal or "")


class FunctionCall(_Strict, kw_only=True):
    name: str
    #: A JSON object as a string, as the model produced it.
    arguments: str


class ToolCall(_Strict, kw_only=True):
    """A tool call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def __post_init__(self) -> None:
        try:
            args = json.loads(self.function.arguments)
        except ValueError:
            raise ValueError("`function.arguments` is not valid JSON") from None
        if not isinstance(args, dict):
            raise ValueError("`function.arguments` is not a JSON object")


class ChatMessage(_Strict, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    #: The reasoning of an earlier assistant turn (thinking models' templates read it).
    reasoning_content: str | None = None
    audio: None = None
    function_call: None = None

    def __post_init__(self) -> None:
        if self.role == "function":
            raise ValueError("role `function` (deprecated by OpenAI) is not supported; use `tool`")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("`tool_calls` is only allowed in an `assistant` message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a `tool` message needs `tool_call_id`")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("`tool_call_id` is only allowed in a `tool` message")

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.plain() for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """This message as chat templates read it (``developer`` becomes ``system``)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            # Templates expect arguments as a mapping (as mlx_lm.server passes them).
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": json.loads(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        return out


# -- tools --------------------------------------------------------------------------


class FunctionDefinition(_Strict, kw_only=True):
    name: FunctionName
    description: str | None = None
    #: The arguments' JSON Schema (free form); absent means no arguments.
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(_Strict, kw_only=True):
    type: Literal["function", "custom"]
    function: FunctionDefinition | None = None
    custom: Any = None

    def __post_init__(self) -> None:
        if self.type == "custom":
            raise ValueError(
                "tool type `custom` (free-form input) is not supported; use `function` tools"
            )
        if self.function is None:
            raise ValueError("Object missing required field `function`")


class FunctionRef(_Strict, kw_only=True):
    name: str


class NamedToolChoice(_Strict, kw_only=True, tag="function", tag_field="type"):
    function: FunctionRef


class AllowedTool(_Strict, kw_only=True):
    type: Literal["function"]
    function: FunctionRef


class AllowedTools(_Strict, kw_only=True):
    mode: Literal["auto", "required"]
    tools: Annotated[list[AllowedTool], Meta(min_length=1, max_length=MAX_TOOLS)]


class AllowedToolsChoice(_Strict, kw_only=True, tag="allowed_tools", tag_field="type"):
    allowed_tools: AllowedTools


class CustomToolChoice(_Strict, kw_only=True, tag="custom", tag_field="type"):
    custom: Any = None

    def __post_init__(self) -> None:
        raise ValueError("tool choice type `custom` is not supported; use `function` tools")


ToolChoice = (
    Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | CustomToolChoice
)


# -- response format ---------------------------------------------------------------


class JsonSchemaSpec(_Strict, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    #: Absent: any JSON value.
    schema: JsonObject | None = None
    #: Output is constrained to the schema whatever this says (strict or not).
    strict: bool | None = None

    def __post_init__(self) -> None:
        from provider.openai.structured import check_schema

        check_schema(self.schema)


class TextFormat(_Strict, kw_only=True, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(_Strict, kw_only=True, tag="json_object", tag_field="type"):
    pass


class JsonSchemaFormat(_Strict, kw_only=True, tag="json_schema", tag_field="type"):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


# -- the rest -------------------------------------------------------------------------


class StreamOptions(_Strict, kw_only=True):
    include_usage: bool | None = None
    #: Pad every streamed chunk with a random ``obfuscation`` string, as OpenAI does.
    include_obfuscation: bool | None = None


class PromptCacheOptions(_Strict, kw_only=True):
    #: ``explicit`` needs breakpoints honoured per part; this provider caches by prefix.
    mode: Literal["implicit"] | None = None
    ttl: str | None = None


#: ``chat_template_kwargs`` keys that would override what the request itself says.
RESERVED_TEMPLATE_KWARGS: Final = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class ChatCompletionRequest(_Strict, kw_only=True):
    """The OpenAI chat completion request body (see :data:`FIELDS` for each field)."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: (
        Annotated[str, Meta(max_length=MAX_STOP_BYTES)]
        | Annotated[
            list[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_BYTES)]],
            Meta(max_length=MAX_STOP),
        ]
        | None
    ) = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = 1
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, Meta(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    # Identifiers and cache hints: no effect on the answer by their definition.
    user: Str512 | None = None
    safety_identifier: Str512 | None = None
    prompt_cache_key: Str512 | None = None
    prompt_cache_retention: Literal["in_memory"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    metadata: Annotated[dict[Str64, Str512], Meta(max_length=MAX_METADATA)] | None = None
    # Accepted only with the value this provider gives anyway.
    store: bool | None = None
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = None
    verbosity: Literal["medium"] | None = None
    # Refused whatever their value.
    audio: None = None
    prediction: None = None
    web_search_options: None = None
    moderation: None = None
    functions: None = None
    function_call: None = None
    # Extensions common to open-model servers (vLLM, mlx_lm.server).
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    chat_template_kwargs: JsonObject | None = None

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "frequency_penalty",
            "presence_penalty",
            "min_p",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None and value != value:  # NaN slips past ge/le
                raise ValueError(f"`{name}` must be a number - at `$.{name}`")
        if self.store:
            raise ValueError(
                "`store: true` is not supported: this provider keeps no completions - at `$.store`"
            )
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true` - at `$.top_logprobs`")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"`logit_bias` has more than {MAX_LOGIT_BIAS} entries - at `$.logit_bias`"
                )
            for key in self.logit_bias:
                if not re.fullmatch(r"[0-9]{1,9}", key):
                    raise ValueError(
                        f"`logit_bias` keys are token ids; {key!r} is not - at `$.logit_bias`"
                    )
        if self.chat_template_kwargs:
            clash = sorted(RESERVED_TEMPLATE_KWARGS.intersection(self.chat_template_kwargs))
            if clash:
                raise ValueError(
                    f"`chat_template_kwargs` may not set {', '.join(clash)}: the request's own "
                    "fields say that - at `$.chat_template_kwargs`"
                )
        self._check_tools()

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or () if t.function is not None]
        if len(set(names)) != len(names):
            raise ValueError("two `tools` have the same function name - at `$.tools`")
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return
        if not names:
            raise ValueError("`tool_choice` names tools but `tools` is empty - at `$.tool_choice`")
        wanted = []
        if isinstance(choice, NamedToolChoice):
            wanted = [choice.function.name]
        elif isinstance(choice, AllowedToolsChoice):
            wanted = [t.function.name for t in choice.allowed_tools.tools]
        for name in wanted:
            if name not in names:
                raise ValueError(
                    f"`tool_choice` names function {name!r}, which is not in `tools` "
                    "- at `$.tool_choice`"
                )

    # -- what the engine reads ---------------------------------------------------------

    def token_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens, else None (engine default)."""
        return self.max_completion_tokens or self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else []
        return list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def include_obfuscation(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_obfuscation)

    def top_logprobs_n(self) -> int | None:
        """How many alternatives per token: None without ``logprobs``, else 0..20."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def tool_mode(self) -> Literal["off", "auto", "required"]:
        """``off`` (no tools, or ``tool_choice: none``), ``auto`` or ``required``."""
        if not self.tools or self.tool_choice == "none":
            return "off"
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            return "required"
        if isinstance(choice, AllowedToolsChoice) and choice.allowed_tools.mode == "required":
            return "required"
        return "auto"

    def offered_tools(self) -> list[FunctionDefinition]:
        """The functions the model may call (``tool_choice`` may narrow ``tools``)."""
        if self.tool_mode() == "off":
            return []
        functions = [t.function for t in self.tools or () if t.function is not None]
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [f for f in functions if f.name == choice.function.name]
        if isinstance(choice, AllowedToolsChoice):
            allowed = {t.function.name for t in choice.allowed_tools.tools}
            return [f for f in functions if f.name in allowed]
        return functions

    def parallel_calls(self) -> bool:
        """Whether the model may make more than one call (OpenAI's default: yes)."""
        return self.parallel_tool_calls is not False

    def json_mode(self) -> Literal["off", "object", "schema"]:
        fmt = self.response_format
        if isinstance(fmt, JsonObjectFormat):
            return "object"
        if isinstance(fmt, JsonSchemaFormat):
            return "schema"
        return "off"


# -- the field rule ------------------------------------------------------------------

Treatment = Literal["honoured", "accepted", "conditional", "refused"]


@dataclass(frozen=True, slots=True)
class Field:
    """What this provider does with one request field; ``doc`` says it for buyers."""

    treatment: Treatment
    doc: str


FIELDS: Final[dict[str, Field]] = {
    "messages": Field(
        "honoured",
        "through the model's chat template; `developer` becomes `system`; text parts are "
        "joined; assistant `tool_calls`, `tool` messages' `tool_call_id`, `name` and "
        "`reasoning_content` reach the template; image, audio and file parts are refused",
    ),
    "model": Field("honoured", "the stub routes by it (404 listing the served models)"),
    "max_tokens": Field("honoured", "completion limit (capped by the context left)"),
    "max_completion_tokens": Field("honoured", "as `max_tokens`; wins when both are given"),
    "temperature": Field("honoured", "0 is greedy"),
    "top_p": Field("honoured", "nucleus sampling"),
    "n": Field("conditional", "1 only; more choices are refused"),
    "stop": Field("honoured", "up to 4 strings, matched on text, never emitted"),
    "stream": Field("honoured", "SSE chunks as OpenAI sends them"),
    "stream_options": Field(
        "honoured", "`include_usage` adds the usage chunk; `include_obfuscation` pads chunks"
    ),
    "seed": Field("honoured", "per request: same seed, same tokens, alone or batched"),
    "frequency_penalty": Field("honoured", "over the completion's tokens so far"),
    "presence_penalty": Field("honoured", "over the completion's tokens so far"),
    "logit_bias": Field("honoured", "token id to -100..100 added to the logits"),
    "logprobs": Field("honoured", "per token: token, bytes, logprob"),
    "top_logprobs": Field("honoured", "0..20 alternatives per token"),
    "response_format": Field(
        "honoured",
        "`text`; `json_object` and `json_schema` by constrained decoding (llguidance); a "
        "schema that does not compile is refused",
    ),
    "tools": Field(
        "honoured",
        "`function` tools go to the chat template; calls are parsed with mlx-lm's parser "
        "for the model's template; `custom` tools are refused; a model whose template has "
        "no tool support refuses them",
    ),
    "tool_choice": Field(
        "honoured",
        "`none`, `auto`, `required`, a named function, `allowed_tools`; `required` and "
        "named functions constrain the output (JSON tool-call formats only)",
    ),
    "parallel_tool_calls": Field("honoured", "false: at most one call"),
    "reasoning_effort": Field(
        "conditional",
        "thinking models: `none` turns thinking off, `medium` (default) on; other levels "
        "and models without thinking refuse anything but `none`",
    ),
    "user": Field("accepted", "an end-user id for OpenAI's abuse checks; no effect here"),
    "safety_identifier": Field("accepted", "as `user`"),
    "prompt_cache_key": Field("accepted", "a cache-routing hint; prefix caching needs none"),
    "prompt_cache_retention": Field("conditional", "`in_memory` only"),
    "prompt_cache_options": Field("conditional", "`mode: implicit` only"),
    "metadata": Field("accepted", "tags for stored completions; nothing is stored"),
    "store": Field("conditional", "false only: no completion is kept"),
    "service_tier": Field("conditional", "`auto` or `default`: there is one tier"),
    "modalities": Field("conditional", '`["text"]` only'),
    "verbosity": Field("conditional", "`medium` only (the default)"),
    "audio": Field("refused", "text only"),
    "prediction": Field("refused", "predicted outputs are not implemented"),
    "web_search_options": Field("refused", "no web search"),
    "moderation": Field("refused", "no in-request moderation"),
    "functions": Field("refused", "deprecated by OpenAI: use `tools`"),
    "function_call": Field("refused", "deprecated by OpenAI: use `tool_choice`"),
    "top_k": Field("honoured", "extension: keep the k most likely tokens (0 or -1: off)"),
    "min_p": Field("honoured", "extension: min-p sampling"),
    "repetition_penalty": Field(
        "honoured", "extension: multiplicative, over the last 20 tokens (mlx-lm's)"
    ),
    "chat_template_kwargs": Field(
        "honoured", "extension: extra template variables, e.g. `enable_thinking`"
    ),
}

#: Why a field's value was refused, by top-level field (for msgspec's own errors).
_REFUSALS: Final[dict[str, str]] = {
    "n": "must be 1: one choice per request is served",
    "audio": "is not supported: this provider answers in text",
    "prediction": "(predicted outputs) is not supported",
    "web_search_options": "is not supported: there is no web search",
    "moderation": "is not supported: there is no in-request moderation",
    "functions": "(deprecated by OpenAI) is not supported; send `tools`",
    "function_call": "(deprecated by OpenAI) is not supported; send `tool_choice`",
    "service_tier": "must be `auto` or `default`: there is one tier",
    "modalities": 'must be `["text"]`: this provider answers in text',
    "verbosity": "must be `medium`: this provider has no verbosity control",
    "prompt_cache_retention": "must be `in_memory`: nothing is kept for 24 h",
    "prompt_cache_options": "must have `mode: implicit`: caching is by prefix",
}


_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)

_UNKNOWN_RE = re.compile(r"^Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?$")
_PATH_RE = re.compile(r" - at `\$\.?([^`]*)`$")
_PART_TYPE_RE = re.compile(r"^(.*content part.*type.*) - at `\$\.([^`]*content\[\d+\])`$", re.S)


class BadRequest(ValueError):
    """A chat completion body that cannot be served; ``str()`` is buyer-facing."""


def _explain(message: str) -> str:
    """Reword msgspec's message for the unknown-field and refused-value cases."""
    unknown = _UNKNOWN_RE.match(message)
    if unknown:
        field, where = unknown.group(1), unknown.group(2)
        path = f"{where}.{field}" if where else field
        return (
            f"unrecognized request field `{path}`: this provider does not know it and "
            f"refuses it rather than ignore it - at `$.{path}`"
        )
    part = _PART_TYPE_RE.match(message)
    if part:  # a content part's own check: it is about its `type`
        return f"{part.group(1)} - at `$.{part.group(2)}.type`"
    path = _PATH_RE.search(message)
    if path:
        top = re.split(r"[.\[]", path.group(1), maxsplit=1)[0]
        if top in _REFUSALS:
            return f"`{top}` {_REFUSALS[top]} ({message})"
    return message


def decode_chat_request(body: str | bytes) -> ChatCompletionRequest:
    """Decode and validate a chat completion body.

    Raises :class:`BadRequest` whose message names the offending field, e.g.
    ``Expected `float` <= 2.0 - at `$.temperature```.
    """
    size = len(body.encode()) if isinstance(body, str) else len(body)
    if size > MAX_BODY_BYTES:
        raise BadRequest(f"request body is {size} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return _request_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise BadRequest(_explain(describe(exc))) from None
