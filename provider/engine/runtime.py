"""What the generation thread owns once the model is loaded, and the helpers both schedulers share.

A :class:`Runtime` is made on the generation thread after loading and used
only there: the model, the tokenizer, the MLX stream, the command queue the
event loop submits jobs through, the stop flag, the prefill pacer and the
inter-token gap window (both of which the event loop may read).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provider.engine import EngineError
from provider.engine.job import GenerationJob, RequestStats, StepKind
from provider.engine.pacing import GapWindow, PrefillPacer
from provider.engine.sampling import Sampler, make_sampler

log = logging.getLogger("mlx_provider.engine")

StepHook = Callable[[RequestStats, StepKind], None]


@dataclass(eq=False)
class Runtime:
    """The generation thread's state and settings (see the module docstring).

    ``commands`` carries jobs, and ``None`` for "stop"; ``hook()`` returns
    the current step hook (tests may set it at any time). ``pacer`` sizes
    prefill chunks (``prefill_step_size`` is its upper bound); ``gaps``
    collects every request's inter-token gaps.
    """

    model: Any
    tokenizer: Any
    stream: Any
    commands: queue.SimpleQueue[GenerationJob | None]
    stopping: threading.Event
    greedy: Sampler
    eos_mask: Any
    max_concurrency: int
    default_max_tokens: int
    prefill_step_size: int
    record_token_ids: bool
    hook: Callable[[], StepHook | None]
    pacer: PrefillPacer
    gaps: GapWindow
    #: The model's logits width (token ids are below it).
    vocab_size: int = 0
    #: Greedy without the EOS mask (for grammar-constrained requests).
    plain_greedy: Sampler | None = None

    def take_commands(self, *, block: bool) -> list[GenerationJob | None]:
        """Everything queued now; with ``block``, wait for at least one item."""
        items: list[GenerationJob | None] = []
        if not block and self.commands.empty():
            return items  # the per-decode-step case: no exception raised and caught
        try:
            items.append(self.commands.get(block=block))
            while True:
                items.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        return items

    def start(self, job: GenerationJob) -> None:
        """Give ``job`` what generating needs: detokenizer, EOS ids, sampler."""
        job.stats.started_at = time.perf_counter()
        job.detokenizer = self.tokenizer.detokenizer
        job.eos = frozenset(self.tokenizer.eos_token_ids)
        # A grammar decides when EOS may come; the benchmark EOS mask must not fight it.
        constrained = job.grammar is not None
        job.sampler = make_sampler(
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            greedy=self.plain_greedy if constrained else self.greedy,
            eos_mask=None if constrained else self.eos_mask,
            top_k=job.top_k,
            min_p=job.min_p,
            vocab_size=self.vocab_size,
        )
        job.record_tokens = self.record_token_ids
        job.gaps = self.gaps

    def step_done(self, job: GenerationJob, kind: StepKind) -> None:
        hook = self.hook()
        if hook is not None:
            hook(job.stats, kind)

    def guarded(self, job: GenerationJob, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn``; an exception fails ``job`` alone. Returns whether the job is done."""
        try:
            fn(*args)
        except Exception as exc:
            log.exception("%s: generation failed", job.request_id)
            job.fail(EngineError("error_internal", f"generation failed: {exc}"))
        return job.done

    def finished(self, job: GenerationJob) -> None:
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
