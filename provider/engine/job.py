"""One request inside the engine: its generation state and its hand-off to the loop.

A :class:`GenerationJob` belongs to one request. The generation thread feeds
it sampled tokens (:meth:`GenerationJob.on_token`): it detokenizes them, holds
back text that could start a stop string, counts them in its
:class:`RequestStats`, and hands text over to the event loop, which reads it
with :meth:`GenerationJob.take`.

Results cross back batched: the job wakes the loop
(``loop.call_soon_threadsafe``) at once for the first token and the finish,
otherwise at most every ``handoff_interval`` (20 ms) and never while a
wake-up is still pending, so a fast decode costs a thread hop per interval,
not per token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from provider.engine import EngineError
from provider.engine.output import OutputParser, Pieces
from provider.engine.pacing import GapWindow
from provider.engine.sampling import (
    GrammarProcessor,
    LogitsProcessor,
    LogprobCapture,
    TokenTable,
    json_tool_format,
    make_logits_processors,
    request_grammar,
)
from provider.engine.text import cut_at_stop, template_tools
from provider.openai.request import ChatCompletionRequest
from provider.openai.response import FinishReason, TokenLogprob, ToolCallOut
from provider.openai.structured import json_schema_of

StepKind = Literal["prefill", "decode"]


@dataclass(slots=True)
class RequestStats:
    """Counters of one request, updated live by the generation thread.

    ``prefill_chunks`` counts prompt chunks processed before the first decode
    step and ``prefill_tokens`` the prompt tokens they held (a prefix taken
    from the prefix cache is not counted: that is ``cached_tokens``);
    ``decode_steps`` counts tokens sampled (EOS included);
    ``completion_tokens`` counts tokens returned in usage (EOS excluded);
    ``token_ids`` holds them when the engine records token ids;
    ``speculation`` says how the request decoded (``"draft"``, ``"lookup"``
    or None) and ``drafted``/``accepted`` count proposed and accepted
    tokens. Times are :func:`time.perf_counter` values; ``max_gap_s`` is
    the longest time between two consecutive sampled tokens.
    """

    request_id: str
    prompt_tokens: int
    max_tokens: int
    prefill_chunks: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    speculation: str | None = None
    drafted: int = 0
    accepted: int = 0
    submitted_at: float = 0.0
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    max_gap_s: float = 0.0
    finished_at: float | None = None

    @property
    def ttft_s(self) -> float | None:
        """Seconds from submission to the first sampled token."""
        if self.first_token_at is None:
            return None
        return self.first_token_at - self.submitted_at

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first one (None below two tokens)."""
        if self.first_token_at is None or self.finished_at is None or self.decode_steps < 2:
            return None
        elapsed = self.finished_at - self.first_token_at
        return (self.decode_steps - 1) / elapsed if elapsed > 0 else None


class GenerationJob:
    """One request: thread-side generation state plus the hand-off buffer.

    Everything above the hand-off fields is touched only by the generation
    thread once the job is submitted; the hand-off fields are guarded by
    ``lock``.
    """

    def __init__(
        self,
        *,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
        cancel: threading.Event,
        loop: asyncio.AbstractEventLoop | None,
        stats: RequestStats,
        handoff_interval: float = 0.0,
        top_k: int = 0,
        min_p: float = 0.0,
        logits_processors: list[LogitsProcessor] | None = None,
        grammar: GrammarProcessor | None = None,
        parser: OutputParser | None = None,
        logprobs: LogprobCapture | None = None,
        conversation: str | None = None,
        use_cache: bool = True,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stop = stop
        self.top_k = top_k
        self.min_p = min_p
        #: Per-request (tokens, logits) processors, grammar included; stateful,
        #: so a scheduler calls them once per generated token, in order.
        self.logits_processors = logits_processors or []
        self.grammar = grammar
        #: Splits the text into content, reasoning and tool calls (None: all content).
        self.parser = parser
        #: Builds each token's logprobs entry (None: not asked for).
        self.logprobs = logprobs
        self.cancel = cancel
        self.loop = loop
        self.stats = stats
        #: Hashed conversation hint for the prefix cache (never the key itself).
        self.conversation = conversation
        #: Whether the prefix cache serves and keeps this request's KV cache.
        self.use_cache = use_cache
        # Set by the generation thread when the job starts.
        self.sampler: Callable[[Any], Any] | None = None
        self.detokenizer: Any = None
        self.eos: frozenset[int] = frozenset()
        self.record_tokens = False
        self.gaps: GapWindow | None = None
        self.held = ""  # decoded text that may be the start of a stop string
        self.done = False
        # Hand-off to the event loop.
        self.lock = threading.Lock()
        self.event = asyncio.Event()
        # The generation thread is done with the job (its KV cache stored, its
        # memory released), which happens after the finish reached the reader.
        # Only a waiter (MlxEngine.settled) costs a wake-up of the loop.
        self.ended = False
        self.watched = False
        self.ended_event = asyncio.Event()
        self.out: list[str] = []
        self.out_reasoning: list[str] = []
        self.out_calls: list[ToolCallOut] = []
        self.out_logprobs: list[TokenLogprob] = []
        self.out_tokens = 0
        self.out_finish: FinishReason | None = None
        self.out_error: EngineError | None = None
        self.wake_pending = False
        # Waking the loop costs a GIL hand-over per wake; at ~1,000 tok/s a wake
        # per token slows decoding measurably. So text is handed over at most
        # every handoff_interval; the first text and the finish go at once.
        self.handoff_interval = handoff_interval
        self.last_wake = 0.0

    # -- generation thread -------------------------------------------------

    def on_token(self, token: int, logprobs: Any = None) -> bool:
        """Consume one sampled token (and its step's log-probabilities); True when finished."""
        stats = self.stats
        stats.decode_steps += 1
        now = time.perf_counter()
        if stats.first_token_at is None:
            stats.first_token_at = now
        else:
            gap = now - (stats.last_token_at or now)
            stats.max_gap_s = max(stats.max_gap_s, gap)
            if self.gaps is not None:
                self.gaps.add(gap)
        stats.last_token_at = now
        if token in self.eos:
            self.detokenizer.finalize()
            self._text(self.detokenizer.last_segment, final=True)
            if not self.done:
                self.finish("stop")
            return True
        stats.completion_tokens += 1
        if self.record_tokens:
            stats.token_ids.append(token)
        if self.logprobs is not None and logprobs is not None:
            entry = self.logprobs.entry(token, logprobs)
            with self.lock:
                self.out_logprobs.append(entry)
        self.detokenizer.add_token(token)
        text = self.detokenizer.last_segment
        final = stats.completion_tokens >= self.max_tokens
        if final:
            self.detokenizer.finalize()
            text += self.detokenizer.last_segment
        self._text(text, final=final)
        if final and not self.done:
            self.finish("length")
        return self.done

    def _text(self, text: str, *, final: bool) -> None:
        """Emit ``text``, holding back a tail that could start a stop string."""
        stopped = False
        if self.stop:
            text, self.held, stopped = cut_at_stop(self.held + text, self.stop, final=final)
        if self.parser is None:
            self.publish(text)
        else:
            self.publish_pieces(self.parser.feed(text))
            if self.parser.stop_requested:
                stopped = True
        if stopped:
            self.finish("stop")

    def finish(self, reason: FinishReason) -> None:
        if self.done:
            return
        self.done = True
        if self.grammar is not None and self.grammar.error is not None and reason != "cancelled":
            self.fail(
                EngineError("error_internal", f"constrained decoding failed: {self.grammar.error}"),
                force=True,
            )
            return
        tail = Pieces()
        if self.parser is not None:
            tail = self.parser.finish(reason)
            if reason == "stop" and self.parser.calls:
                reason = "tool_calls"
        self.stats.finish_reason = reason
        self.stats.finished_at = time.perf_counter()
        self.publish_pieces(tail, finish=reason)

    def fail(self, error: EngineError, *, force: bool = False) -> None:
        if self.done and not force:
            return
        self.done = True
        self.stats.error = str(error)
        self.stats.finished_at = time.perf_counter()
        self.publish("", error=error)

    def publish_pieces(self, pieces: Pieces, *, finish: FinishReason | None = None) -> None:
        with self.lock:
            if pieces.reasoning:
                self.out_reasoning.append(pieces.reasoning)
            self.out_calls.extend(pieces.tool_calls)
        self.publish(
            pieces.content, finish=finish, other=bool(pieces.reasoning or pieces.tool_calls)
        )

    def publish(
        self,
        text: str,
        *,
        finish: FinishReason | None = None,
        error: EngineError | None = None,
        other: bool = False,
    ) -> None:
        if not (text or other) and finish is None and error is None and self.last_wake:
            # Nothing new to say, except at the first token: its text may be
            # held (a partial UTF-8 sequence, a possible stop string), but the
            # stream should start when generation does.
            return
        with self.lock:
            if text:
                self.out.append(text)
            self.out_tokens = self.stats.completion_tokens
            if finish is not None:
                self.out_finish = finish
            if error is not None:
                self.out_error = error
            if self.wake_pending:
                return
            now = time.perf_counter()
            urgent = finish is not None or error is not None or not self.last_wake
            if not urgent and now - self.last_wake < self.handoff_interval:
                return  # a later token, or the finish, hands this text over
            self.wake_pending = True
            self.last_wake = now
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:
            pass  # the loop is closed: nobody is reading any more

    def mark_ended(self) -> None:
        """The generation thread is done with the job (it calls this last)."""
        self.ended = True
        if self.watched and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.ended_event.set)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting

    async def wait_ended(self) -> None:
        """Until :meth:`mark_ended` (event loop side)."""
        # Flag first, then check: either the thread sees the flag and wakes
        # us, or we see that it has ended.
        self.watched = True
        if not self.ended:
            await self.ended_event.wait()

    # -- event loop ----------------------------------------------------------

    def take(self) -> Handoff:
        """Everything handed over since the last take."""
        with self.lock:
            out = Handoff(
                text="".join(self.out),
                tokens=self.out_tokens,
                finish=self.out_finish,
                error=self.out_error,
                reasoning="".join(self.out_reasoning),
                tool_calls=self.out_calls,
                logprobs=self.out_logprobs if self.logprobs is not None else None,
            )
            self.out.clear()
            self.out_reasoning.clear()
            self.out_calls = []
            self.out_logprobs = []
            self.wake_pending = False
            return out


@dataclass(slots=True)
class Handoff:
    """What :meth:`GenerationJob.take` returns."""

    text: str
    tokens: int
    finish: FinishReason | None
    error: EngineError | None
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


def _refuse(message: str) -> EngineError:
    return EngineError("error_internal", f"invalid request: {message}")


def request_options(
    tokenizer: Any,
    request: ChatCompletionRequest,
    prompt: list[int],
    *,
    vocab_size: int,
    table: Callable[[], TokenTable],
) -> dict[str, Any]:
    """What ``request`` asks of the generation thread, as :class:`GenerationJob` arguments.

    Runs off the event loop (it may build the model's :class:`TokenTable`
    and compile a grammar). Refuses, naming the field, what this model
    cannot honour: tools for a template without tool support, a required
    call or tools with ``response_format`` for a non-JSON tool-call format,
    ``reasoning_effort`` levels, out-of-vocabulary ``logit_bias`` ids.
    """
    tools = template_tools(request)
    tool_mode = request.tool_mode()
    if tools is not None and not getattr(tokenizer, "has_tool_calling", False):
        raise _refuse(
            "`tools`: this model's chat template has no tool-call support (send the "
            "request without tools, or with `tool_choice: none`)"
        )
    schema = json_schema_of(request)
    if tools is not None and (tool_mode == "required" or schema is not None):
        if not json_tool_format(tokenizer):
            field = "`tool_choice`" if tool_mode == "required" else "`response_format`"
            raise _refuse(
                f"{field}: a required tool call, or tools with `response_format`, can only be "
                "enforced for models whose tool calls are JSON (<tool_call>{...}</tool_call>)"
            )
    thinking = getattr(tokenizer, "has_thinking", False)
    effort = request.reasoning_effort
    if effort not in (None, "none") and not (thinking and effort == "medium"):
        reason = (
            "this model's thinking has no effort levels; use `none` (off) or `medium` (on)"
            if thinking
            else "this model does not reason; only `none` is accepted"
        )
        raise _refuse(f"`reasoning_effort` {effort!r}: {reason}")
    bias = None
    if request.logit_bias:
        bias = {int(k): float(v) for k, v in request.logit_bias.items()}
        outside = [k for k in bias if k >= vocab_size]
        if outside:
            raise _refuse(
                f"`logit_bias`: token id {outside[0]} is not in this model's vocabulary "
                f"(ids 0..{vocab_size - 1})"
            )
    grammar = None
    if schema is not None or (tools is not None and tool_mode == "required"):
        tt = table()
        source = request_grammar(
            tokenizer=tokenizer,
            table=tt,
            schema=schema,
            tools=tools,
            tool_mode=tool_mode,
            parallel=request.parallel_calls(),
        )
        if source is not None:
            try:
                grammar = GrammarProcessor(tt, source)
            except ValueError as exc:
                raise _refuse(f"`response_format`: the grammar does not compile: {exc}") from None
    top = request.top_logprobs_n()
    has_parser = getattr(tokenizer, "has_tool_calling", False) or thinking
    return {
        "temperature": request.temperature or 0.0,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "top_k": max(0, request.top_k or 0),
        "min_p": request.min_p or 0.0,
        "seed": request.seed,
        "stop": request.stop_list(),
        "logits_processors": make_logits_processors(
            logit_bias=bias,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            grammar=grammar,
        ),
        "grammar": grammar,
        "parser": OutputParser(
            tokenizer, prompt=prompt, tools=tools, parallel=request.parallel_calls()
        )
        if has_parser
        else None,
        "logprobs": LogprobCapture(table(), top) if top is not None else None,
    }
