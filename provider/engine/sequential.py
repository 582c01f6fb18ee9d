"""The sequential scheduler (``max_concurrency == 1``): one request at a time.

Requests run in arrival order. The prompt is prefilled here, one time slice
at a time (:mod:`.prefill`: each chunk sized to take about
``prefill_slice_ms``, at most ``prefill_step_size`` tokens), then
:func:`mlx_lm.generate.generate_step` (the ``stream_generate`` path) takes
the filled cache and the last prompt token and decodes. Cancellation is
checked before every decode step and after every prefill chunk, so within
one slice; requests waiting behind the running one are swept at the same
points, so a cancelled waiter ends at once.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from provider.engine import EngineError
from provider.engine.job import GenerationJob
from provider.engine.prefill import Prefill, fill_chunk
from provider.engine.runtime import Runtime

log = logging.getLogger("mlx_provider.engine")


def serve_sequential(rt: Runtime) -> None:
    """Serve jobs one at a time, in arrival order, until stopped."""
    pending: deque[GenerationJob] = deque()
    while True:
        if not rt.stopping.is_set():  # a sweep during a job may have seen close()
            _sweep(rt, pending, block=not pending)
        if rt.stopping.is_set():
            for job in pending:
                job.finish("cancelled")
            return
        if pending:
            _run_one(rt, pending.popleft(), pending)


def _sweep(rt: Runtime, pending: deque[GenerationJob], *, block: bool = False) -> None:
    """Queue arrivals behind the running job; end waiting jobs already cancelled."""
    for item in rt.take_commands(block=block):
        if item is None:
            rt.stopping.set()
        else:
            pending.append(item)
    for job in [job for job in pending if job.cancel.is_set()]:
        pending.remove(job)
        job.finish("cancelled")
        rt.finished(job)


def _run_one(rt: Runtime, job: GenerationJob, pending: deque[GenerationJob]) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    def stopped() -> bool:
        return job.cancel.is_set() or rt.stopping.is_set()

    try:
        rt.start(job)
        fill = Prefill(job, make_prompt_cache(rt.model))
        _sweep(rt, pending)
        while not fill.filled and not stopped():
            fill_chunk(rt, fill)
            _sweep(rt, pending)
        if stopped():
            job.finish("cancelled")
            rt.finished(job)
            return
        steps = generate_step(
            mx.array(job.prompt[fill.done :]),
            rt.model,
            rt.stream,
            max_tokens=job.max_tokens,
            sampler=job.sampler,
            prompt_cache=fill.cache,
            logits_processors=_with_prefix(job.logits_processors, job.prompt[: fill.done]),
            prefill_step_size=rt.prefill_step_size,
        )
        try:
            for token, logprobs in steps:
                if job.on_token(int(token), logprobs):
                    break
                rt.step_done(job, "decode")
                _sweep(rt, pending)
                if stopped():
                    job.finish("cancelled")
                    break
        finally:
            steps.close()
    except Exception as exc:
        log.exception("%s: generation failed", job.request_id)
        job.fail(EngineError("error_internal", f"generation failed: {exc}"))
    rt.finished(job)


def _with_prefix(processors: list[Any], prefix: list[int]) -> list[Any] | None:
    """``processors`` seeing ``prefix`` before the tokens ``generate_step`` passes them.

    ``generate_step`` gives its logits processors the tokens it processed
    itself; the prompt prefilled before it (all but the last token) would be
    missing from their context (a repetition penalty counts the prompt).
    """
    if not processors:
        return None
    if not prefix:
        return processors
    import mlx.core as mx

    head = mx.array(prefix)

    def seeing_prefix(processor: Any) -> Any:
        return lambda tokens, logits: processor(mx.concatenate([head, tokens]), logits)

    return [seeing_prefix(p) for p in processors]
