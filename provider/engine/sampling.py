"""Per-request sampling: samplers, logits processors, the grammar processor, logprobs.

Everything here belongs to one request and is built for it before it runs
(:func:`make_sampler`, :func:`make_logits_processors`); nothing is shared
between requests except the read-only :class:`TokenTable` of the model.

Built on mlx-lm's pieces: its top-p, min-p and top-k filters
(``mlx_lm.sample_utils``), its logit-bias and repetition-penalty processors,
and the ``(tokens, logits) -> logits`` processor contract that both
:func:`mlx_lm.generate.generate_step` and ``BatchGenerator`` call once per
generated token. Two things differ on purpose:

- sampling draws from the request's own PRNG key (from ``seed``, else
  random), never from MLX's global random state, so a seed gives the same
  tokens whatever else runs, alone or batched;
- presence and frequency penalties count the completion's tokens so far, as
  OpenAI defines them, not mlx-lm's last 20 tokens of prompt and completion.
  Processors count their own calls, so they need not know how much of the
  prompt a prefix cache skipped.

:class:`GrammarProcessor` constrains decoding to an llguidance grammar
(``response_format``, a required tool call): each call feeds the token
sampled last to the matcher and masks every token the grammar forbids.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from provider.openai.response import TokenLogprob, TopLogprob
from provider.openai.structured import json_rule

log = logging.getLogger("mlx_provider.engine")

Sampler = Callable[[Any], Any]
LogitsProcessor = Callable[[Any, Any], Any]


def make_sampler(
    *,
    temperature: float,
    top_p: float,
    seed: int | None,
    greedy: Sampler,
    eos_mask: Any = None,
    top_k: int = 0,
    min_p: float = 0.0,
    vocab_size: int = 0,
) -> Sampler:
    """A request's sampler: ``greedy`` (shared) at temperature 0, else its own key chain.

    Every sampling request owns its PRNG key (from ``seed``, else random), so
    requests never share random state and a seed reproduces its text whatever
    else runs. ``eos_mask`` (additive, or None) is applied first; then top-p,
    min-p and top-k, mlx-lm's filters in mlx-lm's order. ``top_k`` of 0 or at
    least ``vocab_size`` keeps every token.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if temperature <= 0:
        return greedy
    key = mx.random.key((seed if seed is not None else secrets.randbits(64)) % (1 << 64))
    scale = 1.0 / temperature
    mask = eos_mask
    filters: list[Callable[[Any], Any]] = []
    if 0 < top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0 and (vocab_size <= 0 or top_k < vocab_size):
        filters.append(lambda x: apply_top_k(x, top_k))

    def sample(logprobs: Any) -> Any:
        nonlocal key
        if mask is not None:
            logprobs = logprobs + mask
        for f in filters:
            logprobs = f(logprobs)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * scale, key=sub)

    return sample


def _completion_penalty(kind: str, penalty: float) -> LogitsProcessor:
    """OpenAI's presence or frequency penalty over the completion's tokens so far.

    Called once per generated token with every token so far (prompt, then
    completion); the n-th call has n - 1 completion tokens behind it.
    """
    from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty

    make = make_presence_penalty if kind == "presence" else make_frequency_penalty
    calls = 0

    def processor(tokens: Any, logits: Any) -> Any:
        nonlocal calls
        generated = calls
        calls += 1
        if generated == 0:
            return logits
        # mlx-lm's processors look at their last ``context_size`` tokens.
        return make(penalty, generated)(tokens, logits)

    return processor


def make_logits_processors(
    *,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    grammar: GrammarProcessor | None = None,
) -> list[LogitsProcessor]:
    """The request's logits processors, in the order they apply.

    ``logit_bias`` and ``repetition_penalty`` are mlx-lm's (the latter over
    the last 20 tokens, prompt included, as mlx_lm.server does); the OpenAI
    penalties count the completion only; the grammar comes last so nothing
    after it can make a forbidden token likely again.
    """
    from mlx_lm.sample_utils import make_logits_processors as mlx_processors

    processors: list[LogitsProcessor] = list(
        mlx_processors(
            logit_bias=logit_bias or None,
            repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
        )
    )
    if presence_penalty:
        processors.append(_completion_penalty("presence", presence_penalty))
    if frequency_penalty:
        processors.append(_completion_penalty("frequency", frequency_penalty))
    if grammar is not None:
        processors.append(grammar)
    return processors


# -- the model's token table ---------------------------------------------------------


class TokenTable:
    """The model's tokens as llguidance sees them: bytes per token, for grammars and logprobs.

    Built once per model (about a second for a 150k vocabulary) from the
    Hugging Face fast tokenizer; read-only afterwards, so requests share it.
    ``vocab_size`` is the model's logits width, which may exceed the
    tokenizer's (padding rows are never allowed by a grammar).
    """

    def __init__(self, hf_tokenizer: Any, *, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance
        import llguidance.hf

        self.vocab_size = vocab_size
        self.ll = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids) or None
        )
        self._hf = hf_tokenizer
        self._llguidance = llguidance
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as it reads in the output (special tokens by name)."""
        cached = self._bytes.get(token)
        if cached is not None:
            return cached
        if self.ll.is_special_token(token):
            data = self._hf.decode([token]).encode()
        else:
            data = self.ll.decode_bytes([token])
        if len(self._bytes) < 1 << 20:
            self._bytes[token] = data
        return data

    def matcher(self, grammar: str) -> Any:
        """A fresh llguidance matcher for ``grammar``; raises ValueError if it is invalid."""
        matcher = self._llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def special_token_ref(self, text: str) -> str | None:
        """``<[id]>`` when ``text`` is one special token (how a grammar must name it)."""
        ids = self._hf.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.ll.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return None


# -- constrained decoding ------------------------------------------------------------------


class GrammarProcessor:
    """A logits processor that allows only tokens the request's grammar allows.

    Each call (one per generated token, the first with the prompt only)
    feeds the previous sampled token to the matcher, then sets every
    forbidden token's logit to -inf. Once the grammar is complete only EOS
    is allowed. A matcher error (it should not happen: the mask keeps the
    sampler inside the grammar) is kept in :attr:`error`; the job reports it
    at its end, and meanwhile only EOS is allowed, so the request stops.
    """

    def __init__(self, table: TokenTable, grammar: str) -> None:
        import numpy as np

        self.table = table
        self.matcher = table.matcher(grammar)
        self.error: str | None = None
        self._calls = 0
        self._np = np
        eos = sorted(table.ll.eos_tokens) or [table.ll.eos_token]
        only_eos = np.zeros(table.vocab_size, dtype=bool)
        only_eos[eos] = True
        self._only_eos = only_eos

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        np = self._np
        if self._calls > 0 and self.error is None:
            token = int(tokens[-1].item())
            if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
                self.error = self.matcher.get_error() or f"token {token} rejected"
                log.error("grammar rejected a sampled token: %s", self.error)
        self._calls += 1
        if self.error is not None or self.matcher.is_stopped():
            allowed = self._only_eos
        else:
            words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(words, bitorder="little")[: self.table.vocab_size].astype(bool)
            if self.matcher.is_error():
                self.error = self.matcher.get_error()
                allowed = self._only_eos
        width = logits.shape[-1]
        if allowed.shape[0] < width:
            allowed = np.pad(allowed, (0, width - allowed.shape[0]))
        mask = mx.array(allowed[:width])
        return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))


def json_tool_format(tokenizer: Any) -> bool:
    """Whether the model's tool calls are JSON between markers (mlx-lm's ``json_tools``)."""
    parser = getattr(tokenizer, "tool_parser", None)
    return parser is not None and getattr(parser, "__module__", "").endswith(".json_tools")


def call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of one call ``{"name": ..., "arguments": {...}}`` to one of ``functions``."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["function"]["name"]},
                "arguments": f["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def request_grammar(
    *,
    tokenizer: Any,
    table: TokenTable,
    schema: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_mode: str,
    parallel: bool,
) -> str | None:
    """The llguidance (Lark) grammar a request's output must follow, or None.

    - ``response_format`` alone: one JSON document of ``schema``;
    - a required call (``tool_choice`` ``required`` or a named function):
      one call, or several with ``parallel``, in the template's
      ``<tool_call>\n{...}\n</tool_call>`` form, arguments by each
      function's ``parameters``;
    - ``auto`` tools with ``response_format``: calls or the JSON document.

    Calls can only be constrained for JSON tool-call formats; the caller
    checks :func:`json_tool_format` first.
    """
    constrain_calls = tools is not None and (tool_mode == "required" or schema is not None)
    if schema is None and not constrain_calls:
        return None
    rules = []
    alternatives = []
    if constrain_calls:
        assert tools is not None
        start = table.special_token_ref(tokenizer.tool_call_start) or json.dumps(
            tokenizer.tool_call_start
        )
        end = table.special_token_ref(tokenizer.tool_call_end) or json.dumps(
            tokenizer.tool_call_end
        )
        rules.append(f'call: {start} "\\n" {json_rule(call_schema(tools))} "\\n" {end}')
        alternatives.append('call ("\\n" call)*' if parallel else "call")
    if schema is not None and tool_mode != "required":
        alternatives.append(json_rule(schema))
    return "\n".join(["start: " + " | ".join(alternatives), *rules])


# -- logprobs ------------------------------------------------------------------------------


@dataclass(slots=True)
class LogprobCapture:
    """Turns one step's log-probabilities into OpenAI's per-token entry."""

    table: TokenTable
    top: int

    def entry(self, token: int, logprobs: Any) -> TokenLogprob:
        import mlx.core as mx

        lp = logprobs.reshape(-1)
        chosen = float(lp[token].item())
        tops: list[TopLogprob] = []
        if self.top > 0:
            k = min(self.top, lp.shape[0])
            idx = mx.argpartition(-lp, kth=k - 1)[:k]
            values = lp[idx]
            order = mx.argsort(-values)
            ids = idx[order].tolist()
            vals = values[order].tolist()
            for i, v in zip(ids, vals, strict=True):
                tops.append(self._top(int(i), float(v)))
        data = self.table.token_bytes(token)
        return TokenLogprob(
            token=data.decode("utf-8", errors="replace"),
            logprob=_finite(chosen),
            bytes=list(data),
            top_logprobs=tops,
        )

    def _top(self, token: int, value: float) -> TopLogprob:
        data = self.table.token_bytes(token)
        return TopLogprob(
            token=data.decode("utf-8", errors="replace"), logprob=_finite(value), bytes=list(data)
        )


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
    return value if value > -9999.0 else -9999.0
