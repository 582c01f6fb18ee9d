"""The MLX inference engine: local mlx-lm generation behind the :class:`Engine` protocol.

One dedicated thread (``mlx-generation``) owns every MLX call: it loads the
model (:mod:`.loading`), runs the warm-up, and generates. It creates its own
MLX stream on itself (streams from :func:`mx.new_stream` are bound to their
thread). The asyncio loop only tokenizes (in a one-thread executor), submits
jobs through a queue and reads results; it never runs model code and never
waits on it.

Each request is a :class:`~provider.engine.job.GenerationJob`; results cross
back batched (see :mod:`.job`). Scheduling is :mod:`.sequential` for
``max_concurrency == 1`` and :mod:`.batched` above it.

Prompts are prefilled in chunks sized to take ``prefill_slice_ms`` each
(:mod:`.pacing`, from the prefill speed measured as the engine runs), so
cancellation, checked before every decode step and after every prefill
chunk, is seen within one slice, and with continuous batching the running
streams get a decode step between any two chunks. :meth:`MlxEngine.timings`
reports the inter-token latency and the current chunk size.

:attr:`MlxEngine.last_stats` keeps per-request counters (prefill chunks,
decode steps, tokens) that tests use to check how far a request ran after
its ``cancel`` was set, and :attr:`MlxEngine.step_hook` is called on the
generation thread after each step.

Memory: requests start from the longest cached prefix of their prompt
(:mod:`.prompt_cache`), and the sliced prefill runs only the rest; each
one's KV memory is reserved from a budget before it runs, and the
advertised context is capped at what one request can hold
(:mod:`.capacity`). KV caches may be quantized (``kv_bits``), and a
sequential engine decodes greedy requests speculatively (:mod:`.speculative`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from provider.engine import EngineError, EngineTimings, MemoryStatus, ModelInfo, TokenBatch
from provider.engine.batched import serve_batched
from provider.engine.capacity import (
    Capacity,
    KvShape,
    Live,
    default_budget,
    estimate_wait_s,
    measure_kv_shape,
    model_bytes,
    total_memory,
)
from provider.engine.job import GenerationJob, RequestStats, StepKind, request_options
from provider.engine.loading import (
    load_model,
    logits_width,
    make_eos_mask,
    measure_throughput,
    model_hash,
    vocab_size,
)
from provider.engine.pacing import GapWindow, PrefillPacer
from provider.engine.prompt_cache import PromptCache
from provider.engine.runtime import Runtime
from provider.engine.sampling import TokenTable
from provider.engine.sequential import serve_sequential
from provider.engine.speculative import LookupCosts, measure_lookup_costs
from provider.engine.text import encode_chat
from provider.openai.request import ChatCompletionRequest, ChatMessage

log = logging.getLogger("mlx_provider.engine")

DEFAULT_MAX_TOKENS = 512
DEFAULT_PREFILL_STEP_SIZE = 512
#: The default prefill slice: a stall of 100 ms is hardly seen in a stream of text...
DEFAULT_PREFILL_SLICE_MS = 100.0
#: ... but a slice much shorter than a decode step starves the newcomer: with
#: chunks of s and decode steps of d, its prefill takes (1 + d/s) times as long.
#: So the default is at least this many decode steps (docs/benchmarks.md).
SLICE_DECODE_STEPS = 3
DEFAULT_WARMUP_TOKENS = 16
#: Environment variable that turns ``ignore_eos`` on when the constructor leaves it None.
IGNORE_EOS_ENV = "MLX_ENGINE_IGNORE_EOS"
#: How many finished requests :attr:`MlxEngine.last_stats` remembers.
STATS_KEPT = 256
#: Prefix cache entries kept by default.
DEFAULT_PROMPT_CACHE_ENTRIES = 32
#: Default prefix cache bound: this share of RAM, at most half the memory budget.
PROMPT_CACHE_RAM_SHARE = 1 / 8
#: Tokens drafted per speculative round by default (mlx-lm's server uses 3).
DEFAULT_DRAFT_TOKENS = 3
PromptLookup = Literal["auto", "on", "off"]


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
        prefill_slice_ms: how long one prefill chunk should take (the engine
            sizes chunks from the prefill speed it measures). Running streams
            get a decode step, and cancels are looked at, between chunks.
            None (default): 100 ms, or 3 decode steps (from the decode speed
            measured at load) when that is longer. 0: no time slicing,
            every chunk is ``prefill_step_size`` tokens.
        prefill_step_size: the most prompt tokens in one prefill chunk
            (default 512).
        A prompt whose prefix is in the prefix cache is prefilled from
        there; a draft model's cache is prefilled in slices too (with its
        own measured speed).

    Memory:
        memory_budget_bytes: KV memory for running requests plus the prefix
            cache. None (default): what MLX recommends keeping wired (on a
            Mac), else 3/4 of RAM, less the weights and a prefill chunk's
            working memory. A request waits until its KV cache (its whole
            context) fits beside the running ones; the advertised context
            is capped at what one request can hold.
        prompt_cache_bytes: bound of the prefix cache across requests. None
            (default): 1/8 of RAM, at most half the memory budget; 0 turns
            the cache off. It also gives way to running requests.
        prompt_cache_entries: most entries the prefix cache keeps (default 32).
        max_queue_wait_s: a request that does not fit in memory now and
            would wait longer than this for it (estimated as for
            ``preflight_ack``) is refused ``error_queue_full`` (retryable)
            rather than queued. None (default): it always waits.
        kv_bits, kv_group_size, quantized_kv_start: quantize KV caches to
            ``kv_bits`` (2, 3, 4, 6 or 8; default None: off) in groups of
            ``kv_group_size`` (64) once they hold ``quantized_kv_start``
            tokens (5000), as mlx-lm does. Quantized caches cannot be batched,
            so an engine with ``kv_bits`` serves one request at a time.

    Speculative decoding (greedy requests, one request at a time):
        draft_model: a smaller model with the same vocabulary that proposes
            ``num_draft_tokens`` (default 3) tokens per step (mlx-lm's
            speculative decoding). Used when ``max_concurrency`` is 1.
        prompt_lookup: without a draft model, propose the tokens that
            followed the last few tokens' latest earlier occurrence.
            ``"auto"`` (default) measures at load whether verifying drafts
            pays on this machine and drafts only when it does; ``"on"``
            always drafts when there is a match; ``"off"`` never.

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
        prefill_slice_ms: float | None = None,
        handoff_interval: float = 0.02,
        warmup_tokens: int = DEFAULT_WARMUP_TOKENS,
        ignore_eos: bool | None = None,
        record_token_ids: bool = False,
        memory_budget_bytes: int | None = None,
        prompt_cache_bytes: int | None = None,
        prompt_cache_entries: int = DEFAULT_PROMPT_CACHE_ENTRIES,
        max_queue_wait_s: float | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 5000,
        draft_model: str | Path | None = None,
        num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        prompt_lookup: PromptLookup = "auto",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if kv_bits is not None and kv_bits not in (2, 3, 4, 6, 8):
            raise ValueError("kv_bits must be 2, 3, 4, 6 or 8")
        if kv_group_size not in (32, 64, 128):
            raise ValueError("kv_group_size must be 32, 64 or 128")
        if num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        if prompt_lookup not in ("auto", "on", "off"):
            raise ValueError("prompt_lookup must be auto, on or off")
        if min(default_max_tokens, prefill_step_size) < 1:
            raise ValueError("default_max_tokens and prefill_step_size must be >= 1")
        if max_context_tokens is not None and max_context_tokens < 2:
            raise ValueError("max_context_tokens must be >= 2")
        if prefill_slice_ms is not None and prefill_slice_ms < 0:
            raise ValueError("prefill_slice_ms must be >= 0 (0: no time slicing)")
        self.model = str(model)
        self.trust_remote_code = trust_remote_code
        self.max_concurrency = max_concurrency
        self.configured_context_tokens = max_context_tokens
        self.default_max_tokens = default_max_tokens
        self.prefill_step_size = prefill_step_size
        #: As configured; None is resolved for the device when the model loads.
        self.prefill_slice_ms = prefill_slice_ms
        self.handoff_interval = handoff_interval
        self.warmup_tokens = max(2, warmup_tokens)
        if ignore_eos is None:
            ignore_eos = os.environ.get(IGNORE_EOS_ENV, "").lower() in ("1", "true", "yes")
        self.ignore_eos = ignore_eos
        self.record_token_ids = record_token_ids
        self.memory_budget_bytes = memory_budget_bytes
        self.prompt_cache_bytes = prompt_cache_bytes
        self.prompt_cache_entries = prompt_cache_entries
        self.max_queue_wait_s = max_queue_wait_s
        self.kv_bits = kv_bits
        self.kv_group_size = kv_group_size
        self.quantized_kv_start = quantized_kv_start
        self.draft_model = str(draft_model) if draft_model is not None else None
        self.num_draft_tokens = num_draft_tokens
        self.prompt_lookup: PromptLookup = prompt_lookup

        #: Per-request counters by request id, newest last (at most STATS_KEPT).
        self.last_stats: OrderedDict[str, RequestStats] = OrderedDict()
        #: Called on the generation thread after every prefill chunk and decode
        #: step of every request, before the cancel check. For tests; keep it fast.
        self.step_hook: Callable[[RequestStats, StepKind], None] | None = None

        # Shared with the generation thread: it writes, the loop reads.
        self._pacer = PrefillPacer(None, prefill_step_size)
        self._gaps = GapWindow()

        self._info: ModelInfo | None = None
        self._loading = False
        self._load_future: concurrent.futures.Future[ModelInfo] | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[GenerationJob | None] = queue.SimpleQueue()
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
        self._draft: Any = None
        self._draft_pacer: PrefillPacer | None = None
        self._batched = False
        self._shape: KvShape | None = None
        self._capacity: Capacity | None = None
        self._prompt_cache: PromptCache | None = None
        self._lookup: LookupCosts | None = None
        #: What prompt lookup was measured to cost at load (``prompt_lookup="auto"``).
        self.lookup_costs: LookupCosts | None = None
        # Requests holding a slot, by request id (event loop only).
        self._jobs: dict[str, GenerationJob] = {}
        # Jobs submitted, while anything refers to them (the generation thread
        # does until it is done with them).
        self._unsettled: weakref.WeakSet[GenerationJob] = weakref.WeakSet()
        self._vocab_size = 0
        self._table: TokenTable | None = None

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
        conversation_key: str | None = None,
    ) -> AsyncIterator[TokenBatch]:
        """Run one chat completion (see :mod:`provider.engine` for the contract).

        ``request_id`` names the request in logs and :attr:`last_stats`
        (default ``req-N``). ``conversation_key`` is the coordinator's hint
        for the prefix cache (kept hashed). Raises :class:`EngineError`
        before any batch for ``error_model_not_loaded``, ``error_queue_full``
        (all ``max_concurrency`` slots taken) and ``error_context_exceeded``
        (the prompt leaves no room within the context, which is capped at
        what one request's KV cache may take of the memory budget).
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
            prompt, options = await loop.run_in_executor(
                self._tokenize_pool, self._prepare, request
            )
            max_tokens = self._completion_budget(len(prompt), request.token_limit())
            self._refuse_long_memory_wait(len(prompt) + max_tokens)
            job = self._new_job(
                request_id,
                prompt,
                max_tokens,
                cancel,
                loop,
                conversation=_hash_hint(conversation_key),
                **options,
            )
            self._jobs[request_id] = job
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
            if request_id is not None:
                self._jobs.pop(request_id, None)
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
        job = self._new_job(
            f"warm-up-{self._request_seq}", prompt, 4, threading.Event(), loop, use_cache=False
        )
        self._submit(job)
        async for _ in self._results(job):
            pass

    def timings(self) -> EngineTimings:
        """Inter-token latency (the latest gaps of all requests) and prefill pacing."""
        samples, p50, p99, worst = self._gaps.summary()
        pacer = self._pacer
        return EngineTimings(
            inter_token_p50_s=p50,
            inter_token_p99_s=p99,
            inter_token_max_s=worst,
            inter_token_samples=samples,
            prefill_slice_s=pacer.slice_s,
            prefill_chunk_tokens=pacer.last_chunk,
            prefill_tokens_per_s=pacer.tokens_per_s,
        )

    def estimated_wait_ms(self, context_tokens: int) -> int:
        """Milliseconds before a new request of ``context_tokens`` would start its prefill.

        From the requests holding slots now (their prompts left to prefill,
        their completion limits scaled by how much of them requests use), the
        measured prefill and decode speeds, the slots and the memory budget
        (see :func:`provider.engine.capacity.estimate_wait_s`). 0 before load.
        """
        capacity, shape = self._capacity, self._shape
        if capacity is None or shape is None:
            return 0
        admitted = dict(capacity.admitted)
        live = []
        for job in list(self._jobs.values()):
            stats = job.stats
            started = stats.first_token_at is not None
            live.append(
                Live(
                    context=len(job.prompt) + job.max_tokens,
                    prefill_left=(
                        0
                        if started
                        else len(job.prompt) - stats.cached_tokens - stats.prefill_tokens
                    ),
                    decode_left=max(0, job.max_tokens - stats.completion_tokens),
                    admitted=job.request_id in admitted,
                )
            )
        wait = estimate_wait_s(
            live,
            max(1, context_tokens),
            shape=shape,
            budget=capacity.budget,
            slots=self.max_concurrency,
            sequential=not self._batched,
            prefill_tps=capacity.prefill_tps,
            decode_tps=capacity.decode_tps,
            length_ratio=capacity.length_ratio,
        )
        return int(min(wait, 86_400.0) * 1000)

    def memory_status(self) -> MemoryStatus | None:
        """KV memory and prefix cache figures (None before load)."""
        capacity, shape, cache = self._capacity, self._shape, self._prompt_cache
        if capacity is None or shape is None:
            return None
        waiting = 0
        if capacity.blocked is not None:
            waiting = sum(1 for j in list(self._jobs.values()) if j.stats.started_at is None)
        return MemoryStatus(
            budget_bytes=capacity.budget,
            reserved_bytes=capacity.reserved,
            waiting_for_memory=waiting,
            kv_bytes_per_token=shape.bytes_per_token,
            prompt_cache_bytes=cache.nbytes if cache is not None else 0,
            prompt_cache_max_bytes=cache.max_bytes if cache is not None else 0,
            prompt_cache_entries=len(cache) if cache is not None else 0,
            prompt_cache_lookups=cache.lookups if cache is not None else 0,
            prompt_cache_hits=cache.hits if cache is not None else 0,
            prompt_tokens=cache.prompt_tokens if cache is not None else 0,
            cached_tokens=cache.cached_tokens if cache is not None else 0,
        )

    async def settled(self) -> None:
        """Wait until the generation thread is done with every request submitted so far.

        A request's finish reaches its reader first; the thread then stores
        its KV cache and releases its memory. Benchmarks and tests that read
        :meth:`memory_status` between requests wait for this.
        """
        for job in list(self._unsettled):
            if self._thread is None or not self._thread.is_alive():
                return  # a stopped thread ends nothing more
            await job.wait_ended()

    @property
    def prompt_cache(self) -> PromptCache | None:
        """The prefix cache (None before load). Owned by the generation thread."""
        return self._prompt_cache

    def count_tokens(self, request: ChatCompletionRequest) -> int:
        """Prompt tokens of ``request`` after the chat template (runs in the caller)."""
        if self._tokenizer is None:
            raise EngineError("error_model_not_loaded", "the model is not loaded yet")
        return len(self._encode(request))

    # -- event-loop side helpers -------------------------------------------------

    def _encode(self, request: ChatCompletionRequest) -> list[int]:
        try:
            with self._tokenizer_lock:
                return encode_chat(self._tokenizer, request)
        except Exception as exc:
            raise EngineError(
                "error_internal", f"the model's chat template rejected the messages: {exc}"
            ) from exc

    def _prepare(self, request: ChatCompletionRequest) -> tuple[list[int], dict[str, Any]]:
        """Prompt ids and job options of ``request`` (in the tokenizing executor)."""
        prompt = self._encode(request)
        with self._tokenizer_lock:
            options = request_options(
                self._tokenizer,
                request,
                prompt,
                vocab_size=self._vocab_size,
                table=self._token_table,
            )
        return prompt, options

    def _token_table(self) -> TokenTable:
        """The model's token table, built by the first request that needs it (in the
        tokenizing executor, so one at a time), then shared read-only."""
        if self._table is None:
            self._table = TokenTable(
                self._tokenizer._tokenizer,
                vocab_size=self._vocab_size,
                eos_token_ids=self._tokenizer.eos_token_ids,
            )
        return self._table

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

    def _refuse_long_memory_wait(self, context: int) -> None:
        """Refuse a request that would wait for KV memory past ``max_queue_wait_s``."""
        capacity, shape = self._capacity, self._shape
        if capacity is None or shape is None or self.max_queue_wait_s is None:
            return
        if capacity.fits(context) and capacity.blocked is None:
            return
        wait_s = self.estimated_wait_ms(context) / 1000
        if wait_s <= self.max_queue_wait_s:
            return
        raise EngineError(
            "error_queue_full",
            f"this request needs {shape.request_bytes(context) / 2**20:.0f} MiB of KV memory "
            f"for {context} tokens of context, and the requests running here hold "
            f"{capacity.reserved / 2**20:.0f} of {capacity.budget / 2**20:.0f} MiB; it would "
            f"wait about {wait_s:.0f} s for memory, more than {self.max_queue_wait_s:g} s. "
            "Retry on another provider.",
            retryable=True,
        )

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
        conversation: str | None = None,
        use_cache: bool = True,
        **options: Any,
    ) -> GenerationJob:
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
        return GenerationJob(
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
            conversation=conversation,
            use_cache=use_cache,
            **options,
        )

    def _submit(self, job: GenerationJob) -> None:
        thread = self._thread
        if self._stopping.is_set() or thread is None or not thread.is_alive():
            job.finish("cancelled")
            return
        self._unsettled.add(job)
        self._commands.put(job)

    async def _results(self, job: GenerationJob) -> AsyncIterator[TokenBatch]:
        prompt_tokens = len(job.prompt)
        while True:
            await job.event.wait()
            job.event.clear()
            out = job.take()
            if out.error is not None:
                raise out.error
            if out.text or out.finish is not None or out.tokens or out.reasoning or out.tool_calls:
                yield TokenBatch(
                    out.text,
                    prompt_tokens,
                    out.tokens,
                    out.finish,
                    reasoning=out.reasoning,
                    tool_calls=out.tool_calls,
                    logprobs=out.logprobs,
                    cached_tokens=job.stats.cached_tokens,
                )
            if out.finish is not None:
                return

    # -- generation thread -------------------------------------------------------

    def _thread_main(self, loaded: concurrent.futures.Future[ModelInfo]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import wired_limit
        from mlx_lm.sample_utils import greedy_sampler

        try:
            self._stream = mx.new_stream(mx.default_device())
            with mx.stream(self._stream):
                info = self._load_model()
        except BaseException as exc:
            log.exception("loading %s failed", self.model)
            loaded.set_exception(exc)
            return
        loaded.set_result(info)
        assert self._greedy is not None
        rt = Runtime(
            model=self._model,
            tokenizer=self._tokenizer,
            stream=self._stream,
            commands=self._commands,
            stopping=self._stopping,
            greedy=self._greedy,
            eos_mask=self._eos_mask,
            max_concurrency=self.max_concurrency,
            default_max_tokens=self.default_max_tokens,
            prefill_step_size=self.prefill_step_size,
            record_token_ids=self.record_token_ids,
            hook=lambda: self.step_hook,
            pacer=self._pacer,
            gaps=self._gaps,
            vocab_size=self._vocab_size,
            plain_greedy=greedy_sampler,
            prompt_cache=self._prompt_cache,
            capacity=self._capacity,
            kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size,
            quantized_kv_start=self.quantized_kv_start,
            draft_model=self._draft,
            draft_pacer=self._draft_pacer,
            num_draft_tokens=self.num_draft_tokens,
            lookup=self._lookup,
        )
        try:
            with mx.stream(self._stream), wired_limit(self._model, [self._stream]):
                if self._batched:
                    serve_batched(rt)
                else:
                    serve_sequential(rt)
        except BaseException:
            log.exception("the generation thread failed")
        finally:
            self._stopping.set()
            self._drain_queue()

    def _batchable(self) -> bool:
        """Whether the model's KV caches can be merged (what BatchGenerator needs)."""
        from mlx_lm.models.cache import make_prompt_cache

        if self.kv_bits is not None:
            log.warning(
                "kv_bits is set and quantized KV caches cannot be batched: serving the %d "
                "slots one request at a time",
                self.max_concurrency,
            )
            return False
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
                job.mark_ended()

    def _load_model(self) -> ModelInfo:
        import mlx.core as mx
        from mlx_lm.sample_utils import greedy_sampler
        from mlx_lm.utils import get_total_parameters

        log.info("loading model %s", self.model)
        loaded = load_model(
            self.model,
            trust_remote_code=self.trust_remote_code,
            configured_context_tokens=self.configured_context_tokens,
        )
        model, tokenizer = loaded.model, loaded.tokenizer
        self._model, self._tokenizer, self._config = model, tokenizer, loaded.config
        self._context_tokens = loaded.context_tokens
        self._vocab_size = logits_width(model, loaded.config, tokenizer)

        if self.ignore_eos and tokenizer.eos_token_ids:
            mask = make_eos_mask(model, tokenizer, loaded.config)
            self._eos_mask = mask
            self._greedy = lambda logprobs: mx.argmax(logprobs + mask, axis=-1)
        else:
            self._greedy = greedy_sampler

        # The estimate needs every token, so EOS is masked whatever ignore_eos says.
        mask = self._eos_mask
        if mask is None and tokenizer.eos_token_ids:
            mask = make_eos_mask(model, tokenizer, loaded.config)
        tps = measure_throughput(
            model, self._stream, self._encode_text("Hello"), mask, self.warmup_tokens
        )
        slice_ms = self.prefill_slice_ms
        if slice_ms is None:
            slice_ms = default_slice_ms(tps)
        self._pacer.slice_s = slice_ms / 1000.0 or None
        if tps > 0:
            self._pacer.seed(1.0 / tps)
        self._batched = self.max_concurrency > 1 and self._batchable()
        self._load_draft(loaded.config)
        if self._draft is not None:
            # The draft model's prefill is sliced too, timed apart (it is faster);
            # the model's decode step is a slow, so safe, first guess for it.
            self._draft_pacer = PrefillPacer(self._pacer.slice_s, self.prefill_step_size)
            if tps > 0:
                self._draft_pacer.seed(1.0 / tps)
        self._plan_memory(tps)
        self._plan_lookup(tps)
        path = Path(self.model)
        info = ModelInfo(
            model_id=path.resolve().name if path.exists() else self.model,
            model_params_b=get_total_parameters(model) / 1e9,
            max_context_tokens=self._context_tokens,
            model_load_time_ms=loaded.load_ms,
            throughput_tps_estimate=round(tps, 1),
            model_hash=model_hash(path) if path.exists() else None,
        )
        log.info(
            "loaded %s: %.3fB params, context %d, load %d ms, ~%.1f tok/s",
            info.model_id,
            info.model_params_b,
            info.max_context_tokens,
            loaded.load_ms,
            tps,
        )
        return info

    def _load_draft(self, config: dict[str, Any]) -> None:
        """Load ``draft_model`` if set; it must share the model's vocabulary."""
        if self.draft_model is None:
            return
        if self._batched:
            log.warning(
                "draft_model %s is not used: speculative decoding runs with max_concurrency 1",
                self.draft_model,
            )
            return
        draft = load_model(
            self.draft_model,
            trust_remote_code=self.trust_remote_code,
            configured_context_tokens=None,
        )
        if vocab_size(draft.config) != vocab_size(config):
            raise EngineError(
                "error_model_not_loaded",
                f"draft_model {self.draft_model} has a vocabulary of {vocab_size(draft.config)} "
                f"tokens and {self.model} of {vocab_size(config)}: they must share one tokenizer",
            )
        self._draft = draft.model
        log.info("loaded draft model %s (%d ms)", self.draft_model, draft.load_ms)

    def _plan_memory(self, tps: float) -> None:
        """Measure a token's KV bytes, set the budget, cap the context, make the prefix cache."""
        shape = measure_kv_shape(
            self._model,
            kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size,
            quantized_start=self.quantized_kv_start,
        )
        if self._draft is not None:
            extra = measure_kv_shape(self._draft)
            shape = KvShape(
                shape.bytes_per_token + extra.bytes_per_token,
                shape.fixed_bytes + extra.fixed_bytes,
                shape.itemsize,
                shape.kv_bits,
                shape.kv_group_size,
                shape.quantized_start,
            )
        ram, recommended = total_memory()
        budget = self.memory_budget_bytes
        if budget is None:
            weights = model_bytes(self._model) + (model_bytes(self._draft) if self._draft else 0)
            vocab = int(self._eos_mask.shape[-1]) if self._eos_mask is not None else 0
            vocab = vocab or vocab_size(self._config) or 0
            # A prefill chunk's logits (and their log-softmax), in float32.
            working = self.prefill_step_size * vocab * 4 * 2
            budget = default_budget(ram, recommended, weights, working)
        fits = shape.max_tokens(budget)
        if fits < self._context_tokens:
            log.warning(
                "context capped at %d tokens (model: %d): one request's KV cache must fit the "
                "memory budget of %.2f GiB at %.0f bytes a token",
                fits,
                self._context_tokens,
                budget / 2**30,
                shape.bytes_per_token,
            )
            self._context_tokens = max(2, fits)
        self._shape = shape
        self._capacity = Capacity(shape, budget, sequential=not self._batched, decode_tps=tps)
        cache_bytes = self.prompt_cache_bytes
        if cache_bytes is None:
            cache_bytes = min(int(ram * PROMPT_CACHE_RAM_SHARE), budget // 2)
        self._prompt_cache = PromptCache(
            max_bytes=cache_bytes, max_entries=self.prompt_cache_entries
        )
        log.info(
            "memory budget %.2f GiB for KV caches (%.0f bytes a token); prefix cache up to "
            "%.2f GiB in %d entries",
            budget / 2**30,
            shape.bytes_per_token,
            cache_bytes / 2**30,
            self.prompt_cache_entries,
        )

    def _plan_lookup(self, tps: float) -> None:
        """Decide whether prompt-lookup drafting runs (sequential engines without a draft)."""
        if self.prompt_lookup == "off" or self._batched or self._draft is not None:
            return
        k = self.num_draft_tokens
        if self.prompt_lookup == "on":
            self._lookup = LookupCosts(math.inf, (1.0,) * (k + 1))
            return
        costs = measure_lookup_costs(self._model, self._stream, max_draft=k, plain_tps=tps)
        self.lookup_costs = costs
        if costs.pays():
            self._lookup = costs
        log.info(
            "prompt lookup %s: a step takes %.1f ms, verifying %d drafts %.1f ms",
            "on" if self._lookup else "off (it does not pay here)",
            costs.plain_s * 1000,
            k,
            costs.verify_s[-1] * 1000,
        )


def _hash_hint(key: str | None) -> str | None:
    """A conversation key as the prefix cache keeps it: hashed, never the key itself."""
    if not key:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def default_slice_ms(decode_tps: float) -> float:
    """The prefill slice when none is configured: 100 ms, or 3 decode steps if longer."""
    if decode_tps <= 0:
        return DEFAULT_PREFILL_SLICE_MS
    return max(DEFAULT_PREFILL_SLICE_MS, SLICE_DECODE_STEPS * 1000.0 / decode_tps)
