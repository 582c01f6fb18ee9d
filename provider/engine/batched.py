"""The batched scheduler (``max_concurrency > 1``): continuous batching.

One :class:`mlx_lm.generate.BatchGenerator` decodes every running request
together. Every scheduler turn runs one decode step, hands its tokens over,
then runs one prefill chunk of the oldest waiting prompt, so decoding goes on
while a prompt is prefilled. Prompts are prefilled one at a time in arrival
order, each into its own KV cache, the way
:func:`mlx_lm.generate.generate_step` does it; the last chunk also samples the
first token, which goes out at once, and the request then joins the
generator with that cache (``BatchGenerator.insert(..., caches=...)``). So a
buyer's first token never waits behind a later buyer's prefill, and the next
prompt's prefill waits for no more than one decode step.

Cancellation is checked before every decode step and, during prefill, after
every chunk of ``prefill_step_size`` tokens.

A prompt starts from its longest cached prefix (:meth:`Runtime.fetch`: the
prefill starts at ``fill.done``), and every request's KV cache goes to the
prefix cache when it ends (:meth:`Runtime.keep`, :meth:`Runtime.keep_batched`).
The oldest waiting prompt starts only when its KV memory fits beside the
running requests (:meth:`Runtime.admit`); until then it and those behind it
wait, in order.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from provider.engine import EngineError
from provider.engine.job import GenerationJob
from provider.engine.runtime import Runtime

log = logging.getLogger("mlx_provider.engine")


class _Prefill:
    """A prompt being prefilled: its job, its own KV cache, and how far it got."""

    def __init__(self, job: GenerationJob, cache: list[Any]) -> None:
        self.job = job
        self.cache = cache
        self.done = 0  # prompt tokens already in the cache


def serve_batched(rt: Runtime) -> None:
    """Serve jobs with continuous batching until stopped (see the module docstring)."""
    from mlx_lm.generate import BatchGenerator, StopSequences

    def make_generator() -> BatchGenerator:
        return BatchGenerator(
            rt.model,
            max_tokens=rt.default_max_tokens,
            completion_batch_size=rt.max_concurrency,
            # Prompts arrive already prefilled, one at a time.
            prefill_batch_size=1,
            prefill_step_size=rt.prefill_step_size,
            stream=rt.stream,
        )

    # EOS is matched by the job itself, so its token is never emitted.
    eos_stop = StopSequences([(t,) for t in sorted(rt.tokenizer.eos_token_ids)])
    generator = make_generator()
    pending: deque[GenerationJob] = deque()  # arrived, prefill not started
    filling: _Prefill | None = None  # the prompt being prefilled
    running: dict[int, GenerationJob] = {}  # decoding in the generator, by uid
    try:
        while True:
            # Block only when idle; otherwise pick up arrivals between steps.
            idle = not running and not pending and filling is None
            for item in rt.take_commands(block=idle):
                if item is None:
                    rt.stopping.set()
                else:
                    pending.append(item)
            if rt.stopping.is_set():
                waiting = [filling.job] if filling is not None else []
                for job in [*waiting, *pending, *running.values()]:
                    job.finish("cancelled")
                    rt.finished(job)
                return

            for job in [job for job in pending if job.cancel.is_set()]:
                pending.remove(job)
                job.finish("cancelled")
                rt.finished(job)
            if filling is not None and filling.job.cancel.is_set():
                filling.job.finish("cancelled")
                rt.keep(filling.job, filling.cache, filling.job.prompt)
                rt.finished(filling.job)
                filling = None
            cancelled = [uid for uid, job in running.items() if job.cancel.is_set()]
            if cancelled:
                rt.keep_batched(generator, cancelled, running)
                generator.remove(cancelled)
                for uid in cancelled:
                    job = running.pop(uid)
                    job.finish("cancelled")
                    rt.finished(job)

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
                        rt.finished(job)
                    running.clear()
                    generator.close()
                    generator = make_generator()
                    continue
                finished = []
                ended = {r.uid: r for r in responses if r.finish_reason is not None}
                for r in responses:
                    job = running.get(r.uid)
                    if job is None:
                        continue
                    done = rt.guarded(job, job.on_token, int(r.token), r.logprobs)
                    if not done and r.finish_reason is None:
                        done = rt.guarded(job, rt.step_done, job, "decode")
                    if done or r.finish_reason is not None:
                        finished.append(r.uid)
                if finished:
                    rt.keep_batched(generator, finished, running, ended)
                    # The generator already dropped those it finished itself.
                    generator.remove(finished)
                for uid in finished:
                    job = running.pop(uid)
                    if not job.done:  # the generator stopped before the job did
                        job.finish("length")
                    rt.finished(job)

            # Then one chunk of the oldest prompt. Prompts are prefilled one
            # at a time in arrival order, so the first buyer is not held
            # behind the others.
            if filling is None and pending and rt.admit(pending[0], alone=not running):
                job = pending.popleft()
                try:
                    rt.start(job)
                    hit = rt.fetch(job)
                    filling = _Prefill(job, hit.cache)
                    filling.done = hit.tokens
                except Exception as exc:
                    log.exception("%s: could not start", job.request_id)
                    job.fail(EngineError("error_internal", f"generation failed: {exc}"))
                    rt.finished(job)
            if filling is None:
                continue
            job = filling.job
            first = None
            try:
                first = prefill_chunk(rt, filling)
            except Exception as exc:
                log.exception("%s: prefill failed", job.request_id)
                job.fail(EngineError("error_internal", f"generation failed: {exc}"))
            if first is None and not job.done:
                continue  # more chunks to go
            if not job.done:
                assert first is not None
                token, logprobs = first
                done = rt.guarded(job, job.on_token, token, logprobs)
                if not done:
                    done = rt.guarded(job, rt.step_done, job, "decode")
                if not done:
                    # The generator carries on from the first token, over
                    # the cache the prefill filled.
                    try:
                        (uid,) = generator.insert(
                            [[token]],
                            max_tokens=[job.max_tokens],
                            caches=[filling.cache],
                            # A copy: the generator appends to it what it decodes.
                            all_tokens=[list(job.prompt)],
                            samplers=[job.sampler],
                            logits_processors=[job.logits_processors],
                            stop_sequences=[eos_stop],
                        )
                    except Exception as exc:
                        log.exception("%s: could not start decoding", job.request_id)
                        job.fail(EngineError("error_internal", f"generation failed: {exc}"))
                    else:
                        running[uid] = job
            if job.done:
                if job.stats.error is None:  # ended at its first token: keep its prompt
                    rt.keep(job, filling.cache, job.prompt)
                rt.finished(job)
            filling = None
    finally:
        generator.close()


def prefill_chunk(rt: Runtime, fill: _Prefill) -> tuple[int, Any] | None:
    """Run the next chunk of ``fill``'s prompt; once it is all in, its first token and logprobs.

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
        n = min(rt.prefill_step_size, rest)
        rt.model(mx.array(prompt[fill.done : fill.done + n])[None], cache=fill.cache)
        mx.eval([c.state for c in fill.cache])
        mx.clear_cache()
        fill.done += n
        job.stats.prefill_chunks += 1
        rt.step_done(job, "prefill")
        if n < rest or job.cancel.is_set():
            return None  # the next turn runs the next chunk, or ends a cancelled job
    logits = rt.model(mx.array(prompt[-1:])[None], cache=fill.cache)[:, -1, :]
    if job.logits_processors:
        # As generate_step does: the first call sees the prompt only.
        tokens = mx.array(prompt)
        for processor in job.logits_processors:
            logits = processor(tokens, logits)
    assert job.sampler is not None
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = job.sampler(logprobs)
    return int(token.item()), logprobs[0]
