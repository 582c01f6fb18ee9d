"""An Engine for session tests: real thread, real cancel flag, no model.

It honours the :class:`provider.engine.Engine` contract (batched hand-off from
a generation thread, cancel checked every step, one final batch) so the
session is exercised as with MLX, while tests control timing: ``block_s``
blocks the generation thread before the first token (a long prefill, run in
slices of ``slice_s`` with the cancel flag checked between them, as the
MLX engine's time-sliced prefill does), and ``step_s`` is the time per token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from provider.engine import EngineError, EngineTimings, MemoryStatus, ModelInfo, TokenBatch
from provider.engine.pacing import GapWindow
from provider.openai.request import ChatCompletionRequest


@dataclass
class ScriptedEngine:
    tokens: int = 8
    step_s: float = 0.001
    block_s: float = 0.0
    #: The prefill's slice: the cancel flag is looked at this often while blocked.
    slice_s: float = 0.1
    #: Only prompts containing this marker block (the stub's warm-up does not).
    block_marker: str = "[block]"
    load_s: float = 0.0
    context_limit: int = 4096
    words: tuple[str, ...] = ("ok", " yes", " fine")
    started: list[str] = field(default_factory=list)
    #: When each prefill slice ended (time.monotonic), all requests together.
    slice_ends: list[float] = field(default_factory=list)
    #: Set when a blocked prefill has run its first slice.
    prefilling: threading.Event = field(default_factory=threading.Event)
    gaps: GapWindow = field(default_factory=GapWindow)
    #: The conversation_key hint of every request that had one, in order.
    conversation_keys: list[str] = field(default_factory=list)
    _info: ModelInfo | None = None
    _loading: bool = False
    _active: int = 0

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    @property
    def loading(self) -> bool:
        return self._loading

    @property
    def active(self) -> int:
        return self._active

    async def load(self) -> ModelInfo:
        self._loading = True
        try:
            if self.load_s:
                await asyncio.to_thread(time.sleep, self.load_s)
            self._info = ModelInfo("scripted", 0.001, self.context_limit, 1, 100.0)
            return self._info
        finally:
            self._loading = False

    async def generate(
        self,
        request: ChatCompletionRequest,
        cancel: threading.Event,
        *,
        conversation_key: str | None = None,
    ) -> AsyncIterator[TokenBatch]:
        if conversation_key is not None:
            self.conversation_keys.append(conversation_key)
        prompt = sum(len(m.text()) for m in request.messages)
        if prompt > self.context_limit:
            raise EngineError(
                "error_context_exceeded",
                f"prompt is {prompt} tokens; the limit is {self.context_limit}",
            )
        limit = min(self.tokens, request.token_limit() or self.tokens)
        loop = asyncio.get_running_loop()
        out: deque[TokenBatch] = deque()  # append/popleft are thread-safe
        ready = asyncio.Event()
        self._active += 1
        self.started.append(request.messages[-1].text())

        def push(batch: TokenBatch) -> None:
            out.append(batch)
            loop.call_soon_threadsafe(ready.set)

        def run() -> None:
            # A long prefill: the thread computes (and takes the GIL) for
            # block_s, in slices of slice_s, checking the cancel flag between.
            blocks = self.block_marker in request.messages[-1].text()
            end = time.monotonic() + (self.block_s if blocks else 0.0)
            while time.monotonic() < end and not cancel.is_set():
                slice_end = min(end, time.monotonic() + self.slice_s)
                while time.monotonic() < slice_end:
                    sum(i * i for i in range(2000))
                self.slice_ends.append(time.monotonic())
                self.prefilling.set()
            made = 0
            last = None
            while made < limit and not cancel.is_set():
                time.sleep(self.step_s)
                made += 1
                now = time.monotonic()
                if last is not None:
                    self.gaps.add(now - last)
                last = now
                push(TokenBatch(self.words[made % len(self.words)], prompt, made))
            if cancel.is_set():
                push(TokenBatch("", prompt, made, "cancelled"))
            else:
                push(TokenBatch("", prompt, made, "length"))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            while True:
                await ready.wait()
                ready.clear()
                batches = []
                while out:
                    batches.append(out.popleft())
                if not batches:
                    continue
                text = "".join(b.text for b in batches)
                last = batches[-1]
                yield TokenBatch(
                    text, last.prompt_tokens, last.completion_tokens, last.finish_reason
                )
                if last.finish_reason is not None:
                    return
        finally:
            cancel.set()
            await asyncio.to_thread(thread.join)
            self._active -= 1

    def estimated_wait_ms(self, context_tokens: int) -> int:
        # One request at a time here: each running one has its tokens to go.
        return int(self._active * self.tokens * self.step_s * 1000)

    def memory_status(self) -> MemoryStatus | None:
        return None

    async def warm_up(self) -> None:
        await asyncio.to_thread(time.sleep, self.step_s * 2)

    def timings(self) -> EngineTimings:
        samples, p50, p99, worst = self.gaps.summary()
        return EngineTimings(p50, p99, worst, samples, prefill_slice_s=self.slice_s)

    async def close(self) -> None:
        return None
