"""One inference request from ``inference_request`` to ``inference_response_end``.

Each request is a :class:`Job`: its own state object (cancel flag, counters,
deadline), never shared with another request. :func:`relay` drives the
engine's token stream and turns it into ``inference_response_chunk`` frames:

- the first token goes out at once (time to first token is what buyers feel);
- later tokens are coalesced for ``chunk_interval`` (20 ms) so a fast decode
  does not cost a frame per token, yet text never waits longer than that;
- the finish is sent the moment the engine reports it.

The cancel path: ``cancel_request``, a lost connection, a drain that timed out
and the request deadline all set :attr:`Job.cancel`, a
:class:`threading.Event` the generation thread checks on every decode step
and prefill chunk; the engine then ends the stream with ``cancelled`` and the
partial usage. :class:`JobTable` makes sure there is exactly one
``inference_response_end`` per request id, whatever path ends it.

What the buyer was sent is recorded as it is sent, in :attr:`Job.delivered`
(content, finish reason, tool calls): a settlement receipt binds exactly that,
never what the engine produced but did not deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from msgspec import UNSET

from provider.coordinator.messages import (
    EndStatus,
    EndUsage,
    InferenceResponseChunk,
    InferenceResponseEnd,
)
from provider.coordinator.receipts import (
    LATE_RECEIPT_SETTLEMENT,
    Delivered,
    Settlement,
    ToolCall,
)
from provider.engine import Engine, EngineError, TokenBatch
from provider.openai.completions import CompletionFormatter, Output, completion_usage, make_usage
from provider.openai.request import ChatCompletionRequest
from provider.openai.response import Usage
from provider.openai.structured import json_schema_of, judge_output

log = logging.getLogger("mlx_provider.jobs")

#: How many ended request ids are remembered, so a late cancel or a replayed
#: request cannot produce a second end frame.
ENDED_MEMORY = 4096

#: Text that arrives within this fraction of ``chunk_interval`` of its flush
#: time goes out at once. The engine times its hand-offs on the generation
#: thread, which runs up to a wake-up ahead of this loop's clock: holding such
#: a batch for the last millisecond would cost a second wake-up per frame.
FLUSH_SLACK = 0.25


@dataclass
class Job:
    request_id: str
    stream: bool
    received: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    #: Why cancel was set: "cancel_request:<reason>", "deadline", "disconnect", "drain_timeout".
    cancel_reason: str | None = None
    token_limit: int = 0
    #: The coordinator's conversation hint, passed to the engine's prefix cache.
    conversation_key: str | None = None
    #: The request deadline (``request_timeout_s``), once it is armed.
    timeout_s: float | None = None
    chunks_sent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens the engine took from its prefix cache.
    cached_tokens: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    #: What the buyer has been sent so far (the receipt's output): answer
    #: text (not reasoning), then the tool calls and the finish reason.
    delivered: Delivered = field(default_factory=Delivered)
    #: The request's settlement metadata: its end frame then carries a receipt.
    settlement: Settlement | None = None

    def deliver(self, out: Output, *, content: bool = True) -> None:
        """Record output as sent to the buyer (``content`` False: its text was not)."""
        if content:
            self.delivered.add(out.text)
        if out.tool_calls:
            calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in out.tool_calls]
            self.delivered.tool_calls = [*(self.delivered.tool_calls or []), *calls]

    def request_cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    def usage(self) -> Usage:
        return make_usage(self.prompt_tokens, self.completion_tokens)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended: the end frame's status, error text and retry hint."""

    status: EndStatus
    error: str | None = None
    retryable: bool = False


def end_frame(
    job: Job,
    outcome: Outcome,
    *,
    model_hash: str | None = None,
    terminal_ts_ms: int | None = None,
    receipt: str | None = None,
) -> InferenceResponseEnd:
    """The end frame; with settlement metadata it carries the receipt fields
    (``receipt`` only when one could be signed)."""
    usage = job.usage()
    settlement = job.settlement
    return InferenceResponseEnd(
        request_id=job.request_id,
        status=outcome.status,
        chunks_sent=job.chunks_sent,
        usage=EndUsage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            macprovider_model_hash_observed=model_hash or UNSET,
        ),
        error=outcome.error,
        retryable=outcome.retryable,
        terminal_state_ts_unix_ms=(
            terminal_ts_ms if terminal_ts_ms is not None else int(time.time() * 1000)
        ),
        receipt=receipt or UNSET,
        receipt_pending_deadline_seconds=(
            settlement.pending_deadline_seconds if settlement is not None else UNSET
        ),
        late_receipt_settlement=LATE_RECEIPT_SETTLEMENT if settlement is not None else UNSET,
    )


SendChunk = Callable[[InferenceResponseChunk], Awaitable[None]]
PostChunk = Callable[[InferenceResponseChunk], None]


async def relay(
    job: Job,
    request: ChatCompletionRequest,
    engine: Engine,
    send: SendChunk,
    *,
    model_id: str,
    chunk_interval: float = 0.02,
    post: PostChunk | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Run ``request`` on ``engine`` and send its output as chunk frames.

    Returns the outcome for the end frame; the caller sends that frame.
    Raises whatever ``send`` raises (a lost connection) and CancelledError.

    ``post`` (default: await ``send``) queues the last chunk without waiting,
    so the caller's end frame and slot update leave in the same burst: a
    buyer who reads ``[DONE]`` and asks again at once must not find the
    coordinator still counting this request against the slot.

    Streaming text goes out when its batch arrives at least ``chunk_interval``
    after the previous flush, less :data:`FLUSH_SLACK` of it (so 15 ms of
    20); text that arrives sooner waits, at most until ``chunk_interval`` has
    passed. ``clock`` (default :func:`time.monotonic`) times the flushes.
    """
    fmt = CompletionFormatter(
        job.request_id,
        model_id,
        include_usage=request.include_usage(),
        logprobs=request.top_logprobs_n() is not None,
        obfuscation=request.include_obfuscation(),
    )
    schema = json_schema_of(request)
    # Only engines that take hints get one (see provider.engine's contract).
    hints = {"conversation_key": job.conversation_key} if job.conversation_key else {}
    stream = engine.generate(request, job.cancel, **hints)
    pending = Output()
    whole = Output()  # a non-streaming answer; the text a JSON check reads
    last_flush = 0.0
    due = chunk_interval * (1.0 - FLUSH_SLACK)
    final: TokenBatch | None = None

    async def emit(data: str, *, last: bool = False) -> None:
        chunk = InferenceResponseChunk(request_id=job.request_id, seq=job.chunks_sent, data=data)
        job.chunks_sent += 1
        if last and post is not None:
            post(chunk)
        else:
            await send(chunk)

    async def flush() -> None:
        nonlocal last_flush
        first = job.first_token_at is None
        if first:
            job.first_token_at = time.monotonic()
        out = pending.take()
        data = fmt.stream_delta(out, first=first)
        job.deliver(out)
        last_flush = clock()
        await emit(data)

    # Waiting on the engine directly costs one wake of this task per hand-off.
    # Only while text is held for a flush deadline does the wait need a
    # timeout, and then it goes through a task that outlives the timeout
    # (cancelling a __anext__ would end the engine's stream).
    nxt: asyncio.Future[TokenBatch] | None = None
    try:
        while True:
            try:
                if pending and job.stream:
                    if nxt is None:
                        nxt = asyncio.ensure_future(_anext(stream))
                    timeout = max(0.0, last_flush + chunk_interval - clock())
                    done, _ = await asyncio.wait((nxt,), timeout=timeout)
                    if not done:
                        await flush()  # text has waited a full interval
                        continue
                if nxt is not None:
                    batch = await nxt
                    nxt = None
                else:
                    batch = await anext(stream)
            except StopAsyncIteration:
                raise EngineError("error_internal", "engine ended without a finish") from None
            job.prompt_tokens = batch.prompt_tokens
            job.completion_tokens = batch.completion_tokens
            job.cached_tokens = batch.cached_tokens
            pieces = dict(
                reasoning=batch.reasoning, tool_calls=batch.tool_calls, logprobs=batch.logprobs
            )
            if not job.stream:
                whole.add(batch.text, **pieces)
            elif schema is not None:  # a stream keeps only what the JSON check reads
                whole.add(batch.text, tool_calls=batch.tool_calls)
            if batch.finish_reason is not None:
                final = batch
                pending.add(batch.text, **pieces)
                break
            new = batch.text or batch.reasoning or batch.tool_calls or batch.logprobs
            if not new and job.first_token_at is not None:
                continue
            if job.stream:
                pending.add(batch.text, **pieces)
                if job.first_token_at is None or clock() - last_flush >= due:
                    await flush()
            elif job.first_token_at is None:
                job.first_token_at = time.monotonic()
    except EngineError as exc:
        return Outcome(exc.status, str(exc), exc.retryable)
    finally:
        if final is None:
            job.cancel.set()
        await _close_stream(stream, nxt)

    job.finished_at = time.monotonic()
    if final.finish_reason == "cancelled":
        if job.cancel_reason == "deadline":
            limit = f" ({job.timeout_s:g} s)" if job.timeout_s is not None else ""
            error = f"the request ran past request_timeout_s{limit}"
            return Outcome("provider_timeout", error, True)
        return Outcome("cancelled", job.cancel_reason)
    usage = completion_usage(job.prompt_tokens, job.completion_tokens, job.cached_tokens)
    verdict = None
    if schema is not None and not whole.tool_calls:
        verdict = judge_output(whole.text, schema, finish_reason=final.finish_reason)
    if verdict is not None:
        # The stream (if any) ends without a finish or [DONE]: the end frame's
        # status says what is wrong, and the coordinator tells the buyer.
        if job.stream and pending:
            out = pending.take()
            job.deliver(out)
            await emit(fmt.stream_delta(out, first=job.chunks_sent == 0), last=True)
        return Outcome(verdict.status, verdict.message, verdict.retryable)
    if job.stream:
        data = fmt.stream_end(pending, final.finish_reason, usage, first=job.chunks_sent == 0)
        job.deliver(pending)
    else:
        data = fmt.completion(whole, final.finish_reason, usage)
        # Newlines around calls are not sent as content (see CompletionFormatter).
        job.deliver(whole, content=bool(whole.text.strip()) or not whole.tool_calls)
    job.delivered.finish_reason = final.finish_reason
    await emit(data, last=True)
    return Outcome("complete")


async def _anext(stream: AsyncIterator[TokenBatch]) -> TokenBatch:
    return await stream.__anext__()


async def _close_stream(
    stream: AsyncIterator[TokenBatch], nxt: asyncio.Future[TokenBatch] | None
) -> None:
    # An async generator cannot be closed while a __anext__ of it is running:
    # finish (cancel) that first, then aclose() so the engine frees the slot.
    if nxt is not None and not nxt.done():
        nxt.cancel()
        with contextlib.suppress(BaseException):
            await nxt
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class JobTable:
    """The jobs of one connection, plus the ids that have already ended."""

    def __init__(self) -> None:
        self.running: dict[str, Job] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.running)

    def known(self, request_id: str) -> bool:
        return request_id in self.running or request_id in self._ended

    def ended(self, request_id: str) -> bool:
        return request_id in self._ended

    def add(self, job: Job) -> None:
        self.running[job.request_id] = job
        self._idle.clear()

    def mark_ended(self, request_id: str) -> bool:
        """Record that the end frame for ``request_id`` is being sent.

        Returns False if it already was, so the caller sends nothing.
        """
        if request_id in self._ended:
            return False
        self._ended[request_id] = None
        if len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        self.running.pop(request_id, None)
        if not self.running:
            self._idle.set()
        return True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def cancel_all(self, reason: str) -> None:
        for job in self.running.values():
            job.request_cancel(reason)
