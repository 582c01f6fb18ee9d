"""The sequential scheduler (``max_concurrency == 1``): one request at a time.

Requests run in arrival order through :func:`mlx_lm.generate.generate_step`
(the ``stream_generate`` path). Cancellation is checked before every decode
step and, during prefill, after every chunk of ``prefill_step_size`` tokens;
requests waiting behind the running one are swept at the same points, so a
cancelled waiter ends at once.

Each request starts from its longest cached prefix and leaves its KV cache
to the prefix cache when it ends (:meth:`Runtime.fetch`,
:meth:`Runtime.keep`). Eligible requests decode speculatively
(:mod:`.speculative`): with the draft model, or by prompt lookup.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

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
                rt.finished(job)
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
    def progress(done: int, total: int) -> None:
        if 0 < done < total:
            job.stats.prefill_chunks += 1
            rt.step_done(job, "prefill")
        _sweep(rt, pending)
        if job.cancel.is_set() or rt.stopping.is_set():
            raise _Cancelled

    cache: list[Any] | None = None
    draft: list[Any] | None = None
    # What the cache may hold: the prompt, then every token out.
    seen = list(job.prompt)
    try:
        rt.start(job)
        rt.admit(job, alone=True)
        hit = rt.fetch(job, draft=rt.draft_model is not None)
        cache, draft = hit.cache, hit.draft
        steps = rt.token_steps(job, hit, progress)
        try:
            for token, logprobs, _ in steps:
                seen.append(token)
                if job.on_token(token, logprobs):
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
        cache = None  # its state is unknown: do not keep it
    # The draft cache moved only if the draft model ran.
    rt.keep(job, cache, seen, draft=draft if job.stats.speculation == "draft" else None)
    rt.finished(job)
