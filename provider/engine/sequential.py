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
    from mlx_lm.generate import generate_step, maybe_quantize_kv_cache, speculative_generate_step

    from provider.engine.speculative import LookupStats, lookup_generate_step, prefill

    def progress(done: int, total: int) -> None:
        if 0 < done < total:
            job.stats.prefill_chunks += 1
            rt.step_done(job, "prefill")
        _sweep(rt, pending)
        if job.cancel.is_set() or rt.stopping.is_set():
            raise _Cancelled

    cache: list[Any] | None = None
    draft: list[Any] | None = None
    seen = list(job.prompt)  # what the cache may hold: the prompt, then each token out
    lookup = LookupStats()
    try:
        rt.start(job)
        rt.admit(job, alone=True)
        hit = rt.fetch(job, draft=rt.draft_model is not None)
        cache = hit.cache
        assert cache is not None
        mode = rt.speculation(job, cache)
        job.stats.speculation = mode
        steps: Any
        if mode is None:
            steps = generate_step(
                mx.array(job.prompt[hit.tokens :]),
                rt.model,
                rt.stream,
                max_tokens=job.max_tokens,
                sampler=job.sampler,
                prefill_step_size=rt.prefill_step_size,
                prompt_progress_callback=progress,
                prompt_cache=cache,
                **rt.kv_args(),
            )
        else:
            kv = rt.kv_args()

            def quantize(layers: list[Any]) -> None:
                maybe_quantize_kv_cache(
                    layers, kv["quantized_kv_start"], kv["kv_group_size"], kv["kv_bits"]
                )

            parts = [(rt.model, cache, hit.tokens)]
            if mode == "draft":
                draft = hit.draft
                assert draft is not None
                parts.append((rt.draft_model, draft, hit.tokens if hit.draft is not None else 0))
            prefill(
                parts, job.prompt, step=rt.prefill_step_size, progress=progress, quantize=quantize
            )
            if mode == "draft":
                steps = speculative_generate_step(
                    mx.array(job.prompt[-1:]),
                    rt.model,
                    rt.draft_model,
                    rt.stream,
                    num_draft_tokens=rt.num_draft_tokens,
                    max_tokens=job.max_tokens,
                    sampler=job.sampler,
                    prompt_cache=cache + draft,
                    **kv,
                )
            else:
                assert rt.lookup is not None
                steps = lookup_generate_step(
                    job.prompt,
                    rt.model,
                    cache,
                    rt.stream,
                    sampler=job.sampler,
                    max_tokens=job.max_tokens,
                    costs=rt.lookup,
                    stats=lookup,
                    **kv,
                )
        try:
            for item in steps:
                token = int(item[0])
                seen.append(token)
                if mode == "draft":
                    # A round yields its accepted drafts, then one token of the model's own.
                    job.stats.accepted += bool(item[2])
                    job.stats.drafted += 0 if item[2] else rt.num_draft_tokens
                if job.on_token(token):
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
    if job.stats.speculation == "lookup":
        job.stats.drafted, job.stats.accepted = lookup.drafted, lookup.accepted
    rt.keep(job, cache, seen, draft=draft)
    rt.finished(job)
