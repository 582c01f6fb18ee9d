"""The batched scheduler (``max_concurrency > 1``): continuous batching.

One :class:`mlx_lm.generate.BatchGenerator` decodes every running request
together. Every scheduler turn runs one decode step, hands its tokens over,
then runs one prefill chunk of the oldest waiting prompt, so decoding goes on
while a prompt is prefilled. Each chunk is sized to take about
``prefill_slice_ms`` (:mod:`.prefill`, :mod:`.pacing`; at most
``prefill_step_size`` tokens), so a running stream waits about one slice
plus its own decode step for its next token, however long the newcomer's
prompt. Prompts are prefilled one at a time in arrival order, each into its
own KV cache, the way :func:`mlx_lm.generate.generate_step` does it; the
last chunk is followed, in the same turn, by the last prompt token, which
samples the first token; that goes out at once, and the request then joins
the generator with that cache (``BatchGenerator.insert(..., caches=...)``).
So a buyer's first token never waits behind a later buyer's prefill.

The newcomer's chunk and the running requests' decode step go through the
model one after the other, not as one mixed batch: on the CPU a forward
pass costs the same per token either way (measured in
``docs/benchmarks.md``), and a mixed batch would need a ragged forward pass
mlx-lm does not have.

Cancellation is checked before every decode step and after every prefill
chunk, so within one slice.

A prompt starts from its longest cached prefix (:meth:`Runtime.fetch`: the
sliced prefill starts at ``fill.done``, so a second turn prefills only what
is new), and every request's KV cache goes to the prefix cache when it ends
(:meth:`Runtime.keep`, :meth:`Runtime.keep_batched`); a prompt cancelled
while it is prefilled leaves as much as it filled. The oldest waiting prompt
starts only when its KV memory fits beside the running requests
(:meth:`Runtime.admit`); until then it and those behind it wait, in order.
"""

from __future__ import annotations

import logging
from collections import deque

from provider.engine import EngineError
from provider.engine.job import GenerationJob
from provider.engine.prefill import Prefill, fill_chunk, first_token
from provider.engine.runtime import Runtime

log = logging.getLogger("mlx_provider.engine")


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
    filling: Prefill | None = None  # the prompt being prefilled
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

            # Then one slice of the oldest prompt. Prompts are prefilled one
            # at a time in arrival order, so the first buyer is not held
            # behind the others.
            if filling is None and pending and rt.admit(pending[0], alone=not running):
                job = pending.popleft()
                try:
                    rt.start(job)
                    hit = rt.fetch(job)
                    filling = Prefill(job, hit.cache, done=hit.tokens)
                except Exception as exc:
                    log.exception("%s: could not start", job.request_id)
                    job.fail(EngineError("error_internal", f"generation failed: {exc}"))
                    rt.finished(job)
            if filling is None:
                continue
            job = filling.job
            first = None
            try:
                fill_chunk(rt, filling)
                if filling.filled and not job.cancel.is_set():
                    # In the same turn: no decode step of the others comes
                    # between the prefill and the first token.
                    first = first_token(rt, filling)
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
