"""The sequential scheduler (``max_concurrency == 1``): one request at a time.

Requests run in arrival order through :func:`mlx_lm.generate.generate_step`
(the ``stream_generate`` path). Cancellation is checked before every decode
step and, during prefill, after every chunk of ``prefill_step_size`` tokens;
requests waiting behind the running one are swept at the same points, so a
cancelled waiter ends at once.
"""

from __future__ import annotations

import logging
from collections import deque

from provider.engine import EngineError
from provider.engine.job import GenerationJob
from provider.engine.runtime import Runtime

log = logging.getLogger("mlx_provider.engine")


class _Cancelled(Exception):
    """Raised from the prefill progress callback to abandon a prompt between chunks."""


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

    def progress(done: int, total: int) -> None:
        if 0 < done < total:
            job.stats.prefill_chunks += 1
            rt.step_done(job, "prefill")
        _sweep(rt, pending)
        if job.cancel.is_set() or rt.stopping.is_set():
            raise _Cancelled

    try:
        rt.start(job)
        steps = generate_step(
            mx.array(job.prompt),
            rt.model,
            rt.stream,
            max_tokens=job.max_tokens,
            sampler=job.sampler,
            logits_processors=job.logits_processors or None,
            prefill_step_size=rt.prefill_step_size,
            prompt_progress_callback=progress,
        )
        try:
            for token, logprobs in steps:
                if job.on_token(int(token), logprobs):
                    break
                rt.step_done(job, "decode")
                _sweep(rt, pending)
                if job.cancel.is_set() or rt.stopping.is_set():
                    job.finish("cancelled")
                    break
        finally:
            steps.close()
    except _Cancelled:
        job.finish("cancelled")
    except Exception as exc:
        log.exception("%s: generation failed", job.request_id)
        job.fail(EngineError("error_internal", f"generation failed: {exc}"))
    rt.finished(job)
