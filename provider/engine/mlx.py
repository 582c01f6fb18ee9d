"""The MLX inference engine: local mlx-lm generation behind the :class:`Engine` protocol.

One dedicated thread (``mlx-generation``) owns every MLX call: it loads the
model, runs the warm-up, and generates. It creates its own MLX stream on
itself (streams from :func:`mx.new_stream` are bound to their thread). The
asyncio loop only tokenizes (in a one-thread executor), submits jobs through a
queue and reads results; it never runs model code and never waits on it.

Results cross back batched: the generation thread appends text to the job's
buffer and wakes the loop (``loop.call_soon_threadsafe``) at once for the
first token and the finish, otherwise at most every ``handoff_interval``
(20 ms) and never while a wake-up is still pending, so a fast decode costs a
thread hop per interval, not per token. Each wake-up becomes one
:class:`TokenBatch`.

Scheduling:

- ``max_concurrency == 1``: requests run one at a time in arrival order through
  :func:`mlx_lm.generate.generate_step` (the ``stream_generate`` path).
- ``max_concurrency > 1``: one :class:`mlx_lm.generate.BatchGenerator`
  (continuous batching) decodes every running request together. Every
  scheduler turn runs one decode step, hands its tokens over, then runs one
  prefill chunk of the oldest waiting prompt, so decoding goes on while a
  prompt is prefilled. Prompts are prefilled one at a time in arrival order,
  each into its own KV cache, the way :func:`mlx_lm.generate.generate_step`
  does it; the last chunk also samples the first token, which goes out at
  once, and the request then joins the generator with that cache
  (``BatchGenerator.insert(..., caches=...)``). So a buyer's first token
  never waits behind a later buyer's prefill, and the next prompt's prefill
  waits for no more than one decode step.

Cancellation is checked before every decode step and, during prefill, after
every chunk of ``prefill_step_size`` tokens. :attr:`MlxEngine.last_stats` keeps
per-request counters (prefill chunks, decode steps, tokens) that tests use to
check how far a request ran after its ``cancel`` was set, and
:attr:`MlxEngine.step_hook` is called on the generation thread after each step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from provider.engine import EngineError, ModelInfo, TokenBatch
from provider.protocol import ChatCompletionRequest, ChatMessage, FinishReason

log = logging.getLogger("mlx_provider.engine")

DEFAULT_MAX_TOKENS = 512
DEFAULT_PREFILL_STEP_SIZE = 512
DEFAULT_WARMUP_TOKENS = 16
#: Context size assumed when neither the model config nor the caller gives one.
FALLBACK_CONTEXT_TOKENS = 4096
#: Environment variable that turns ``ignore_eos`` on when the constructor leaves it None.
IGNORE_EOS_ENV = "MLX_ENGINE_IGNORE_EOS"
#: How many finished requests :attr:`MlxEngine.last_stats` remembers.
STATS_KEPT = 256

StepKind = Literal["prefill", "decode"]


class _Cancelled(Exception):
    """Raised from the prefill progress callback to abandon a prompt between chunks."""


@dataclass(slots=True)
class RequestStats:
    """Counters of one request, updated live by the generation thread.

    ``prefill_chunks`` counts prompt chunks processed before the first decode
    step; ``decode_steps`` counts tokens sampled (EOS included);
    ``completion_tokens`` counts tokens returned in usage (EOS excluded);
    ``token_ids`` holds them when the engine records token ids. Times are
    :func:`time.perf_counter` values.
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


class _Job:
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
        held = self.held + text
        cut = min((i for i in (held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            self.publish(held[:cut])
            self.finish("stop")
            return
        keep = 0 if final else _partial_stop_len(held, self.stop)
        self.held = held[len(held) - keep :]
        self.publish(held[: len(held) - keep])

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

    # -- event loop ----------------------------------------------------------

    def take(self) -> tuple[str, int, FinishReason | None, EngineError | None]:
        with self.lock:
            text = "".join(self.out)
            self.out.clear()
            self.wake_pending = False
            return text, self.out_tokens, self.out_finish, self.out_error


class _Prefill:
    """A prompt being prefilled: its job, its own KV cache, and how far it got."""

    def __init__(self, job: _Job, cache: list[Any]) -> None:
        self.job = job
        self.cache = cache
        self.done = 0  # prompt tokens already in the cache


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    if not text:
        return 0
    last = text[-1]
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            # Comparing the last character first keeps long stop strings cheap.
            if stop[k - 1] == last and text.endswith(stop[:k]):
                best = k
                break
    return best


class MlxEngine:
    """Local mlx-lm inference implementing :class:`provider.engine.Engine`.

    Model:
        model: a local model directory or a Hugging Face repo id (downloaded by
            mlx-lm's loader, with a progress bar, on machines that reach the
            hub).
        trust_remote_code: passed to ``mlx_lm.load`` (default False).

    Capacity:
        max_concurrency: requests served at once (default 1). 1 generates one
            request at a time; above 1 uses continuous batching.
        max_context_tokens: context limit in tokens (prompt plus completion).
            None (default) takes the model config's ``max_position_embeddings``;
            a configured value is capped by the model's.
        default_max_tokens: completion limit when the request gives none
            (default 512).

    Prefill:
        prefill_step_size: prompt tokens per prefill chunk (default 512); also
            the granularity at which a cancel interrupts a prefill.

    Hand-off:
        handoff_interval: seconds between wake-ups of the event loop while a
            request decodes (default 0.02, the session's chunk interval). The
            first text and the finish are handed over at once; text between
            waits at most this long plus one decode step. 0 wakes per token.

    Measurement and tests:
        warmup_tokens: tokens generated by the warm-up in :meth:`load` that
            measures ``throughput_tps_estimate`` (default 16).
        ignore_eos: never sample an EOS token, for benchmarks and tests that
            need exact lengths. None (default) reads the environment variable
            ``MLX_ENGINE_IGNORE_EOS`` (``1``/``true``: on), so a benchmark
            can switch it on for a provider started from the command line;
            otherwise off.
        record_token_ids: keep every generated token id in
            :attr:`last_stats` (default False: a long context would hold a lot).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        trust_remote_code: bool = False,
        max_concurrency: int = 1,
        max_context_tokens: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        handoff_interval: float = 0.02,
        warmup_tokens: int = DEFAULT_WARMUP_TOKENS,
        ignore_eos: bool | None = None,
        record_token_ids: bool = False,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if min(default_max_tokens, prefill_step_size) < 1:
            raise ValueError("default_max_tokens and prefill_step_size must be >= 1")
        if max_context_tokens is not None and max_context_tokens < 2:
            raise ValueError("max_context_tokens must be >= 2")
        self.model = str(model)
        self.trust_remote_code = trust_remote_code
        self.max_concurrency = max_concurrency
        self.configured_context_tokens = max_context_tokens
        self.default_max_tokens = default_max_tokens
        self.prefill_step_size = prefill_step_size
        self.handoff_interval = handoff_interval
        self.warmup_tokens = max(2, warmup_tokens)
        if ignore_eos is None:
            ignore_eos = os.environ.get(IGNORE_EOS_ENV, "").lower() in ("1", "true", "yes")
        self.ignore_eos = ignore_eos
        self.record_token_ids = record_token_ids

        #: Per-request counters by request id, newest last (at most STATS_KEPT).
        self.last_stats: OrderedDict[str, RequestStats] = OrderedDict()
        #: Called on the generation thread after every prefill chunk and decode
        #: step of every request, before the cancel check. For tests; keep it fast.
        self.step_hook: Callable[[RequestStats, StepKind], None] | None = None

        self._info: ModelInfo | None = None
        self._loading = False
        self._load_future: concurrent.futures.Future[ModelInfo] | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._closed = False
        self._active = 0
        self._request_seq = 0
        # Tokenizing runs off the loop, one request at a time: HF fast
        # tokenizers are not safe to call from several threads at once.
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="mlx-tokenize"
        )
        self._tokenizer_lock = threading.Lock()
        # Owned by the generation thread once load() starts.
        self._model: Any = None
        self._tokenizer: Any = None
        self._config: dict[str, Any] = {}
        self._stream: Any = None
        self._greedy: Callable[[Any], Any] | None = None
        self._eos_mask: Any = None
        self._context_tokens = 0

    # -- Engine protocol -----------------------------------------------------

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    @property
    def loading(self) -> bool:
        return self._loading

    @property
    def active(self) -> int:
        """Requests holding a slot now (started and not yet ended)."""
        return self._active

    @property
    def tokenizer(self) -> Any:
        """The mlx-lm ``TokenizerWrapper`` (None before :meth:`load`)."""
        return self._tokenizer

    async def load(self) -> ModelInfo:
        """Load the model on the generation thread and measure its throughput.

        Idempotent: later (and concurrent) calls return the same
        :class:`ModelInfo`. Raises :class:`EngineError`
        (``error_model_not_loaded``) when the model cannot be loaded; a later
        call tries again.
        """
        if self._info is not None:
            return self._info
        if self._closed:
            raise EngineError("error_model_not_loaded", "the engine is closed")
        if self._load_future is None:
            self._loading = True
            self._load_future = concurrent.futures.Future()
            self._thread = threading.Thread(
                target=self._thread_main,
                args=(self._load_future,),
                name="mlx-generation",
                daemon=True,
            )
            self._thread.start()
        try:
            info = await asyncio.wrap_future(self._load_future)
        except Exception as exc:
            self._load_future = None
            self._loading = False
            if isinstance(exc, EngineError):
                raise
            raise EngineError(
                "error_model_not_loaded", f"could not load model {self.model}: {exc}"
            ) from exc
        self._info = info
        self._loading = False
        return info

    async def generate(
        self,
        request: ChatCompletionRequest,
        cancel: threading.Event,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[TokenBatch]:
        """Run one chat completion (see :mod:`provider.engine` for the contract).

        ``request_id`` names the request in logs and :attr:`last_stats`
        (default ``req-N``). Raises :class:`EngineError` before any batch for
        ``error_model_not_loaded``, ``error_queue_full`` (all
        ``max_concurrency`` slots taken) and ``error_context_exceeded``.
        """
        if self._info is None or self._closed:
            raise EngineError(
                "error_model_not_loaded",
                "the engine is closed" if self._closed else "the model is not loaded yet",
                retryable=True,
            )
        if self._active >= self.max_concurrency:
            raise EngineError(
                "error_queue_full",
                f"all {self.max_concurrency} generation slots are busy",
                retryable=True,
            )
        self._active += 1
        finished = False
        try:
            self._request_seq += 1
            request_id = request_id or f"req-{self._request_seq}"
            loop = asyncio.get_running_loop()
            prompt = await loop.run_in_executor(self._tokenize_pool, self._encode, request)
            max_tokens = self._completion_budget(len(prompt), request.token_limit())
            job = self._new_job(
                request_id,
                prompt,
                max_tokens,
                cancel,
                loop,
                temperature=request.temperature or 0.0,
                top_p=request.top_p if request.top_p is not None else 1.0,
                seed=request.seed,
                stop=request.stop_list(),
            )
            log.debug(
                "%s: prompt %d tokens, max_tokens %d, temperature %s, %d stop strings",
                request_id,
                len(prompt),
                max_tokens,
                request.temperature,
                len(job.stop),
            )
            self._submit(job)
            async for batch in self._results(job):
                if batch.finish_reason is not None:
                    finished = True
                yield batch
            finished = True
        finally:
            self._active -= 1
            if not finished:
                # Left early (aclose, task cancelled, error): stop the work.
                cancel.set()

    async def close(self) -> None:
        """Stop the generation thread; in-flight and queued requests end cancelled."""
        self._closed = True
        self._stopping.set()
        self._commands.put(None)
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join)
        self._tokenize_pool.shutdown(wait=False)

    # -- extras ----------------------------------------------------------------

    async def warm_up(self) -> None:
        """Run a tiny generation (4 tokens) so the next request starts hot.

        It does not take a slot; with busy slots it simply waits its turn.
        """
        if self._info is None or self._closed:
            raise EngineError("error_model_not_loaded", "the model is not loaded yet")
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self._tokenize_pool, self._encode_text, "Hello")
        self._request_seq += 1
        job = self._new_job(f"warm-up-{self._request_seq}", prompt, 4, threading.Event(), loop)
        self._submit(job)
        async for _ in self._results(job):
            pass

    def count_tokens(self, request: ChatCompletionRequest) -> int:
        """Prompt tokens of ``request`` after the chat template (runs in the caller)."""
        if self._tokenizer is None:
            raise EngineError("error_model_not_loaded", "the model is not loaded yet")
        return len(self._encode(request))

    # -- event-loop side helpers -------------------------------------------------

    def _encode(self, request: ChatCompletionRequest) -> list[int]:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        tokenizer = self._tokenizer
        try:
            with self._tokenizer_lock:
                if tokenizer.has_chat_template:
                    ids = tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=True
                    )
                else:
                    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
                    ids = tokenizer.encode(text + "assistant: ")
        except Exception as exc:
            raise EngineError(
                "error_internal", f"the model's chat template rejected the messages: {exc}"
            ) from exc
        if hasattr(ids, "input_ids"):  # a BatchEncoding from some tokenizers
            ids = ids["input_ids"]
        return list(ids)

    def _encode_text(self, text: str) -> list[int]:
        return self._encode(
            ChatCompletionRequest(messages=[ChatMessage(role="user", content=text)])
        )

    def _completion_budget(self, prompt_tokens: int, requested: int | None) -> int:
        limit = self._context_tokens
        room = limit - prompt_tokens
        if room < 1:
            raise EngineError(
                "error_context_exceeded",
                f"prompt is {prompt_tokens} tokens; this provider's context limit is "
                f"{limit} tokens (prompt plus completion), so there is no room for a "
                "completion. Shorten the messages.",
            )
        return min(requested or self.default_max_tokens, room)

    def _new_job(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        cancel: threading.Event,
        loop: asyncio.AbstractEventLoop,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> _Job:
        stats = RequestStats(
            request_id=request_id,
            prompt_tokens=len(prompt),
            max_tokens=max_tokens,
            submitted_at=time.perf_counter(),
        )
        self.last_stats[request_id] = stats
        self.last_stats.move_to_end(request_id)
        while len(self.last_stats) > STATS_KEPT:
            self.last_stats.popitem(last=False)
        return _Job(
            request_id=request_id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop or [],
            cancel=cancel,
            loop=loop,
            stats=stats,
            handoff_interval=self.handoff_interval,
        )

    def _submit(self, job: _Job) -> None:
        thread = self._thread
        if self._stopping.is_set() or thread is None or not thread.is_alive():
            job.finish("cancelled")
            return
        self._commands.put(job)

    async def _results(self, job: _Job) -> AsyncIterator[TokenBatch]:
        prompt_tokens = len(job.prompt)
        while True:
            await job.event.wait()
            job.event.clear()
            text, completion_tokens, finish, error = job.take()
            if error is not None:
                raise error
            if text or finish is not None or completion_tokens:
                yield TokenBatch(text, prompt_tokens, completion_tokens, finish)
            if finish is not None:
                return

    # -- generation thread -------------------------------------------------------

    def _thread_main(self, loaded: concurrent.futures.Future[ModelInfo]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import wired_limit

        try:
            self._stream = mx.new_stream(mx.default_device())
            with mx.stream(self._stream):
                info = self._load_model()
        except BaseException as exc:
            log.exception("loading %s failed", self.model)
            loaded.set_exception(exc)
            return
        loaded.set_result(info)
        try:
            with mx.stream(self._stream), wired_limit(self._model, [self._stream]):
                if self.max_concurrency > 1 and self._batchable():
                    self._serve_batched()
                else:
                    self._serve_sequential()
        except BaseException:
            log.exception("the generation thread failed")
        finally:
            self._stopping.set()
            self._drain_queue()

    def _batchable(self) -> bool:
        """Whether the model's KV caches can be merged (what BatchGenerator needs)."""
        from mlx_lm.models.cache import make_prompt_cache

        if all(hasattr(c, "merge") for c in make_prompt_cache(self._model)):
            return True
        log.warning(
            "%s cannot be batched (its caches do not merge): serving the %d slots one "
            "request at a time",
            self.model,
            self.max_concurrency,
        )
        return False

    def _drain_queue(self) -> None:
        while True:
            try:
                job = self._commands.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.finish("cancelled")

    def _load_model(self) -> ModelInfo:
        import mlx.core as mx
        from mlx_lm import load as mlx_load
        from mlx_lm.sample_utils import greedy_sampler
        from mlx_lm.utils import get_total_parameters

        log.info("loading model %s", self.model)
        start = time.perf_counter()
        model, tokenizer, config = mlx_load(
            self.model, return_config=True, trust_remote_code=self.trust_remote_code
        )
        load_ms = int((time.perf_counter() - start) * 1000)
        self._model, self._tokenizer, self._config = model, tokenizer, config

        model_context = config.get("max_position_embeddings") or config.get("text_config", {}).get(
            "max_position_embeddings"
        )
        configured = self.configured_context_tokens
        if model_context and configured:
            self._context_tokens = min(configured, int(model_context))
        else:
            self._context_tokens = int(configured or model_context or FALLBACK_CONTEXT_TOKENS)

        if self.ignore_eos and tokenizer.eos_token_ids:
            mask = self._make_eos_mask()
            self._eos_mask = mask
            self._greedy = lambda logprobs: mx.argmax(logprobs + mask, axis=-1)
        else:
            self._greedy = greedy_sampler

        tps = self._measure_throughput()
        path = Path(self.model)
        info = ModelInfo(
            model_id=path.resolve().name if path.exists() else self.model,
            model_params_b=get_total_parameters(model) / 1e9,
            max_context_tokens=self._context_tokens,
            model_load_time_ms=load_ms,
            throughput_tps_estimate=round(tps, 1),
            model_hash=_model_hash(path) if path.exists() else None,
        )
        log.info(
            "loaded %s: %.3fB params, context %d, load %d ms, ~%.1f tok/s",
            info.model_id,
            info.model_params_b,
            info.max_context_tokens,
            load_ms,
            tps,
        )
        return info

    def _measure_throughput(self) -> float:
        """Decode tokens/s of one greedy stream, after a short untimed run."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        prompt = mx.array(self._encode_text("Hello"))
        # The estimate needs every token, so EOS is masked whatever ignore_eos says.
        mask = self._eos_mask
        if mask is None and self._tokenizer.eos_token_ids:
            mask = self._make_eos_mask()

        def sampler(logprobs: Any) -> Any:
            return mx.argmax(logprobs if mask is None else logprobs + mask, axis=-1)

        tps = 0.0
        for n in (4, self.warmup_tokens):
            first = last = time.perf_counter()
            for i, _ in enumerate(
                generate_step(prompt, self._model, self._stream, max_tokens=n, sampler=sampler)
            ):
                last = time.perf_counter()
                if i == 0:
                    first = last
            if last > first:
                tps = (n - 1) / (last - first)
        return tps

    def _make_eos_mask(self) -> Any:
        """An additive logits mask: -inf at the EOS ids, 0 elsewhere."""
        import mlx.core as mx

        try:
            # Shapes are known without evaluating, so this costs no forward pass.
            vocab = self._model(mx.array([[0]])).shape[-1]
        except Exception:
            vocab = _vocab_size(self._config) or len(self._tokenizer)
        mask = mx.zeros((vocab,))
        mask[mx.array(sorted(self._tokenizer.eos_token_ids))] = -float("inf")
        return mask

    def _start(self, job: _Job) -> None:
        job.stats.started_at = time.perf_counter()
        job.detokenizer = self._tokenizer.detokenizer
        job.eos = frozenset(self._tokenizer.eos_token_ids)
        job.sampler = self._make_sampler(job)
        job.record_tokens = self.record_token_ids

    def _make_sampler(self, job: _Job) -> Callable[[Any], Any]:
        """The job's sampler: the shared greedy one, or its own seeded key chain.

        Every sampling request owns its PRNG key (from ``seed``, else random),
        so requests never share random state and a seed reproduces its text
        whatever else runs.
        """
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p

        assert self._greedy is not None
        if job.temperature <= 0:
            return self._greedy
        seed = job.seed if job.seed is not None else secrets.randbits(64)
        key = mx.random.key(seed % (1 << 64))
        scale = 1.0 / job.temperature
        top_p = job.top_p
        mask = self._eos_mask

        def sample(logprobs: Any) -> Any:
            nonlocal key
            if mask is not None:
                logprobs = logprobs + mask
            if 0 < top_p < 1:
                logprobs = apply_top_p(logprobs, top_p)
            key, sub = mx.random.split(key)
            return mx.random.categorical(logprobs * scale, key=sub)

        return sample

    def _step_done(self, job: _Job, kind: StepKind) -> None:
        hook = self.step_hook
        if hook is not None:
            hook(job.stats, kind)

    def _serve_sequential(self) -> None:
        pending: deque[_Job] = deque()
        while True:
            if not self._stopping.is_set():  # a sweep during a job may have seen close()
                self._sweep(pending, block=not pending)
            if self._stopping.is_set():
                for job in pending:
                    job.finish("cancelled")
                return
            if pending:
                self._run_one(pending.popleft(), pending)

    def _sweep(self, pending: deque[_Job], *, block: bool = False) -> None:
        """Queue arrivals behind the running job; end waiting jobs already cancelled."""
        for item in self._take_commands(block=block):
            if item is None:
                self._stopping.set()
            else:
                pending.append(item)
        for job in [job for job in pending if job.cancel.is_set()]:
            pending.remove(job)
            job.finish("cancelled")
            self._finished(job)

    def _run_one(self, job: _Job, pending: deque[_Job]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        def progress(done: int, total: int) -> None:
            if 0 < done < total:
                job.stats.prefill_chunks += 1
                self._step_done(job, "prefill")
            self._sweep(pending)
            if job.cancel.is_set() or self._stopping.is_set():
                raise _Cancelled

        try:
            self._start(job)
            steps = generate_step(
                mx.array(job.prompt),
                self._model,
                self._stream,
                max_tokens=job.max_tokens,
                sampler=job.sampler,
                prefill_step_size=self.prefill_step_size,
                prompt_progress_callback=progress,
            )
            try:
                for token, _ in steps:
                    if job.on_token(int(token)):
                        break
                    self._step_done(job, "decode")
                    self._sweep(pending)
                    if job.cancel.is_set() or self._stopping.is_set():
                        job.finish("cancelled")
                        break
            finally:
                steps.close()
        except _Cancelled:
            job.finish("cancelled")
        except Exception as exc:
            log.exception("%s: generation failed", job.request_id)
            job.fail(EngineError("error_internal", f"generation failed: {exc}"))
        self._finished(job)

    def _serve_batched(self) -> None:
        from mlx_lm.generate import BatchGenerator, StopSequences
        from mlx_lm.models.cache import make_prompt_cache

        def make_generator() -> BatchGenerator:
            return BatchGenerator(
                self._model,
                max_tokens=self.default_max_tokens,
                completion_batch_size=self.max_concurrency,
                # Prompts arrive already prefilled, one at a time.
                prefill_batch_size=1,
                prefill_step_size=self.prefill_step_size,
                stream=self._stream,
            )

        # EOS is matched by the job itself, so its token is never emitted.
        eos_stop = StopSequences([(t,) for t in sorted(self._tokenizer.eos_token_ids)])
        generator = make_generator()
        pending: deque[_Job] = deque()  # arrived, prefill not started
        filling: _Prefill | None = None  # the prompt being prefilled
        running: dict[int, _Job] = {}  # decoding in the generator, by uid
        try:
            while True:
                # Block only when idle; otherwise pick up arrivals between steps.
                idle = not running and not pending and filling is None
                for item in self._take_commands(block=idle):
                    if item is None:
                        self._stopping.set()
                    else:
                        pending.append(item)
                if self._stopping.is_set():
                    waiting = [filling.job] if filling is not None else []
                    for job in [*waiting, *pending, *running.values()]:
                        job.finish("cancelled")
                        self._finished(job)
                    return

                for job in [job for job in pending if job.cancel.is_set()]:
                    pending.remove(job)
                    job.finish("cancelled")
                    self._finished(job)
                if filling is not None and filling.job.cancel.is_set():
                    filling.job.finish("cancelled")
                    self._finished(filling.job)
                    filling = None
                cancelled = [uid for uid, job in running.items() if job.cancel.is_set()]
                if cancelled:
                    generator.remove(cancelled)
                    for uid in cancelled:
                        job = running.pop(uid)
                        job.finish("cancelled")
                        self._finished(job)

                # One decode step for every running request; its tokens go out
                # before the next prefill chunk runs.
                if running:
                    try:
                        _, responses = generator.next()
                    except Exception as exc:
                        log.exception("batched generation step failed")
                        error = EngineError("error_internal", f"generation failed: {exc}")
                        for job in running.values():
                            job.fail(error)
                            self._finished(job)
                        running.clear()
                        generator.close()
                        generator = make_generator()
                        continue
                    finished = []
                    for r in responses:
                        job = running.get(r.uid)
                        if job is None:
                            continue
                        done = self._guarded(job, job.on_token, int(r.token))
                        if not done and r.finish_reason is None:
                            done = self._guarded(job, self._step_done, job, "decode")
                        if done or r.finish_reason is not None:
                            finished.append(r.uid)
                    if finished:
                        # The generator already dropped those it finished itself.
                        generator.remove(finished)
                    for uid in finished:
                        job = running.pop(uid)
                        if not job.done:  # the generator stopped before the job did
                            job.finish("length")
                        self._finished(job)

                # Then one chunk of the oldest prompt. Prompts are prefilled one
                # at a time in arrival order, so the first buyer is not held
                # behind the others.
                if filling is None and pending:
                    job = pending.popleft()
                    try:
                        self._start(job)
                        filling = _Prefill(job, make_prompt_cache(self._model))
                    except Exception as exc:
                        log.exception("%s: could not start", job.request_id)
                        job.fail(EngineError("error_internal", f"generation failed: {exc}"))
                        self._finished(job)
                if filling is None:
                    continue
                job = filling.job
                token = None
                try:
                    token = self._prefill_chunk(filling)
                except Exception as exc:
                    log.exception("%s: prefill failed", job.request_id)
                    job.fail(EngineError("error_internal", f"generation failed: {exc}"))
                if token is None and not job.done:
                    continue  # more chunks to go
                if not job.done:
                    assert token is not None
                    done = self._guarded(job, job.on_token, token)
                    if not done:
                        done = self._guarded(job, self._step_done, job, "decode")
                    if not done:
                        # The generator carries on from the first token, over
                        # the cache the prefill filled.
                        try:
                            (uid,) = generator.insert(
                                [[token]],
                                max_tokens=[job.max_tokens],
                                caches=[filling.cache],
                                all_tokens=[job.prompt],
                                samplers=[job.sampler],
                                stop_sequences=[eos_stop],
                            )
                        except Exception as exc:
                            log.exception("%s: could not start decoding", job.request_id)
                            job.fail(EngineError("error_internal", f"generation failed: {exc}"))
                        else:
                            running[uid] = job
                filling = None
                if job.done:
                    self._finished(job)
        finally:
            generator.close()

    def _prefill_chunk(self, fill: _Prefill) -> int | None:
        """Run the next chunk of ``fill``'s prompt; once it is all in, its first token.

        As in :func:`mlx_lm.generate.generate_step`: every prompt token but the
        last goes through the model in chunks of ``prefill_step_size``, then the
        last one gives the logits of the first completion token. That last step
        follows the last chunk in the same call, so no decode step of other
        requests comes between the prefill and the first token.
        """
        import mlx.core as mx

        job = fill.job
        prompt = job.prompt
        rest = len(prompt) - 1 - fill.done
        if rest > 0:
            n = min(self.prefill_step_size, rest)
            self._model(mx.array(prompt[fill.done : fill.done + n])[None], cache=fill.cache)
            mx.eval([c.state for c in fill.cache])
            mx.clear_cache()
            fill.done += n
            job.stats.prefill_chunks += 1
            self._step_done(job, "prefill")
            if n < rest or job.cancel.is_set():
                return None  # the next turn runs the next chunk, or ends a cancelled job
        logits = self._model(mx.array(prompt[-1:])[None], cache=fill.cache)[:, -1, :]
        assert job.sampler is not None
        token = job.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return int(token.item())

    def _take_commands(self, *, block: bool) -> list[_Job | None]:
        """Everything queued now; with ``block``, wait for at least one item."""
        items: list[_Job | None] = []
        if not block and self._commands.empty():
            return items  # the per-decode-step case: no exception raised and caught
        try:
            items.append(self._commands.get(block=block))
            while True:
                items.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return items

    def _guarded(self, job: _Job, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn``; an exception fails ``job`` alone. Returns whether the job is done."""
        try:
            fn(*args)
        except Exception as exc:
            log.exception("%s: generation failed", job.request_id)
            job.fail(EngineError("error_internal", f"generation failed: {exc}"))
        return job.done

    def _finished(self, job: _Job) -> None:
        stats = job.stats
        if stats.finished_at is None:
            stats.finished_at = time.perf_counter()
        ttft = stats.ttft_s
        tps = stats.decode_tps
        log.debug(
            "%s: %s after %d prompt + %d completion tokens (ttft %s ms, %s tok/s)",
            job.request_id,
            stats.finish_reason or "error",
            stats.prompt_tokens,
            stats.completion_tokens,
            "-" if ttft is None else f"{ttft * 1000:.0f}",
            "-" if tps is None else f"{tps:.1f}",
        )


def _vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else None


def _model_hash(path: Path) -> str:
    """sha256 of config.json plus the weight index (or weight file names and sizes).

    Cheap: it identifies a checkpoint without reading gigabytes of weights.
    """
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = path / name
        if file.exists():
            digest.update(name.encode() + b"\0" + file.read_bytes())
    weights = sorted(path.glob("*.safetensors"))
    digest.update(json.dumps([[w.name, w.stat().st_size] for w in weights]).encode())
    return "sha256:" + digest.hexdigest()
