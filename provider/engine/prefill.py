"""Prefilling a prompt one time slice at a time: what both schedulers share.

As in :func:`mlx_lm.generate.generate_step`, every prompt token but the last
goes through the model in chunks that only fill the KV cache (their logits
are never evaluated), then the last token gives the logits of the first
completion token. Unlike there, each chunk is sized by
:class:`~provider.engine.pacing.PrefillPacer` to take about
``prefill_slice_ms``, and the scheduler gets control back after every chunk:
the batched one runs a decode step of the running requests, both look at
the cancel flags. So a running stream waits at most about one slice (plus
its own decode step) for its next token, and a cancel is seen within one
slice.
"""

from __future__ import annotations

import time
from typing import Any

from provider.engine.job import GenerationJob
from provider.engine.runtime import Runtime


class Prefill:
    """A prompt being prefilled: its job, its KV cache, and how far it got.

    ``done`` counts the prompt tokens already in ``cache``: 0 for a fresh
    cache, more when the cache already holds a prefix of the prompt.
    """

    def __init__(self, job: GenerationJob, cache: list[Any], done: int = 0) -> None:
        self.job = job
        self.cache = cache
        self.done = done

    @property
    def filled(self) -> bool:
        """Whether only the last prompt token is left (it gives the first token)."""
        return self.done >= len(self.job.prompt) - 1


def fill_chunk(rt: Runtime, fill: Prefill) -> None:
    """Put the next slice of ``fill``'s prompt into its cache (nothing when it is filled).

    The chunk's size comes from the pacer and its time goes back to it. MLX
    computes lazily and a batched decode step may still be running on the
    stream, so the stream is synchronised before the clock starts: the time
    is the chunk's own.
    """
    import mlx.core as mx

    job = fill.job
    rest = len(job.prompt) - 1 - fill.done
    if rest <= 0:
        return
    n = rt.pacer.chunk(rest)
    mx.synchronize(rt.stream)
    start = time.perf_counter()
    rt.model(mx.array(job.prompt[fill.done : fill.done + n])[None], cache=fill.cache)
    mx.eval([c.state for c in fill.cache])
    rt.pacer.record(n, time.perf_counter() - start)
    mx.clear_cache()
    fill.done += n
    job.stats.prefill_chunks += 1
    job.stats.prefill_tokens += n
    rt.step_done(job, "prefill")


def first_token(rt: Runtime, fill: Prefill) -> tuple[int, Any]:
    """Run the last prompt token through the filled cache: the first completion token.

    Returns the token and its step's log-probabilities. The request's logits
    processors see the prompt, as in :func:`mlx_lm.generate.generate_step`.
    """
    import mlx.core as mx

    job = fill.job
    prompt = job.prompt
    logits = rt.model(mx.array(prompt[-1:])[None], cache=fill.cache)[:, -1, :]
    if job.logits_processors:
        tokens = mx.array(prompt)
        for processor in job.logits_processors:
            logits = processor(tokens, logits)
    assert job.sampler is not None
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = job.sampler(logprobs)
    fill.done = len(prompt)
    return int(token.item()), logprobs[0]
