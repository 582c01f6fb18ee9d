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
from provider.engine.text import cut_at_stop
from provider.openai.response import FinishReason

StepKind = Literal["prefill", "decode"]


@dataclass(slots=True)
class RequestStats:
    """Counters of one request, updated live by the generation thread.

    ``prefill_chunks`` counts prompt chunks processed before the first decode
    step; ``decode_steps`` counts tokens sampled (EOS included);
    ``completion_tokens`` counts tokens returned in usage (EOS excluded);
    ``token_ids`` holds them when the engine records token ids;
    ``cached_tokens`` counts prompt tokens taken from the prefix cache;
    ``speculation`` says how the request decoded (``"draft"``, ``"lookup"``
    or None) and ``drafted``/``accepted`` count proposed and accepted
    tokens. Times are :func:`time.perf_counter` values.
    """

    request_id: str
    prompt_tokens: int
    max_tokens: int
    prefill_chunks: int = 0
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

    def on_token(self, token: int) -> bool:
        """Consume one sampled token; return True when the request is finished."""
        stats = self.stats
        stats.decode_steps += 1
        if stats.first_token_at is None:
            stats.first_token_at = time.perf_counter()
        if token in self.eos:
            self.detokenizer.finalize()
            self._text(self.detokenizer.last_segment, final=True)
            if not self.done:
                self.finish("stop")
            return True
        stats.completion_tokens += 1
        if self.record_tokens:
            stats.token_ids.append(token)
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
        if not self.stop:
            self.publish(text)
            return
        emit, self.held, stopped = cut_at_stop(self.held + text, self.stop, final=final)
        self.publish(emit)
        if stopped:
            self.finish("stop")

    def finish(self, reason: FinishReason) -> None:
        if self.done:
            return
        self.done = True
        self.stats.finish_reason = reason
        self.stats.finished_at = time.perf_counter()
        self.publish("", finish=reason)

    def fail(self, error: EngineError) -> None:
        if self.done:
            return
        self.done = True
        self.stats.error = str(error)
        self.stats.finished_at = time.perf_counter()
        self.publish("", error=error)

    def publish(
        self, text: str, *, finish: FinishReason | None = None, error: EngineError | None = None
    ) -> None:
        if not text and finish is None and error is None and self.last_wake:
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

    def take(self) -> tuple[str, int, FinishReason | None, EngineError | None]:
        with self.lock:
            text = "".join(self.out)
            self.out.clear()
            self.wake_pending = False
            return text, self.out_tokens, self.out_finish, self.out_error
