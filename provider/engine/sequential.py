"""The sequential scheduler (``max_concurrency == 1``): one request at a time.

Requests run in arrival order. Each starts from its longest cached prefix
(:meth:`Runtime.fetch`), and the rest of its prompt is prefilled here, one
time slice at a time (:mod:`.prefill`: each chunk sized to take about
``prefill_slice_ms``, at most ``prefill_step_size`` tokens); a request that
decodes with a draft model has the draft's cache filled the same way, after
the model's. Then :meth:`Runtime.token_steps` decodes from the last prompt
token: :func:`mlx_lm.generate.generate_step` (the ``stream_generate`` path),
or speculatively (:mod:`.speculative`: with the draft model, or by prompt
lookup) when the request is eligible.

Cancellation is checked before every decode step and after every prefill
chunk, so within one slice; requests waiting behind the running one are
swept at the same points, so a cancelled waiter ends at once. When a request
ends (finished, stopped or cancelled, even during its prefill) its KV cache
goes to the prefix cache, as far as it was filled (:meth:`Runtime.keep`).
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
    def stopped() -> bool:
        return job.cancel.is_set() or rt.stopping.is_set()

    cache: list[Any] | None = None
    draft: list[Any] | None = None
    # What the cache may hold: the prompt, then every token out.
    seen = list(job.prompt)
    try:
        rt.start(job)
        rt.admit(job, alone=True)
        hit = rt.fetch(job, draft=rt.draft_model is not None)
        cache, draft = hit.cache, hit.draft
        assert cache is not None
        mode = rt.speculation(job, cache)
        fills = [Prefill(job, cache, hit.tokens)]
        if mode == "draft":
            assert draft is not None
            fills.append(
                Prefill(job, draft, hit.draft_tokens, model=rt.draft_model, pacer=rt.draft_pacer)
            )
        _sweep(rt, pending)
        for fill in fills:
            while not fill.filled and not stopped():
                fill_chunk(rt, fill)
                _sweep(rt, pending)
        if stopped():
            job.finish("cancelled")
        else:
            steps = rt.token_steps(job, mode, cache, draft)
            try:
                for token, logprobs, _ in steps:
                    seen.append(token)
                    if job.on_token(token, logprobs):
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
        cache = None  # its state is unknown: do not keep it
    # The draft cache moved with the model's only once the draft model decoded
    # (a prefill cancelled part-way leaves it behind: the model's is kept alone).
    rt.keep(job, cache, seen, draft=draft if job.stats.speculation == "draft" else None)
    rt.finished(job)
