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

A prefill may start part-way: a cache from the prefix cache already holds
the first ``done`` tokens, and only the rest goes through the model. The
same slices fill a draft model's cache for speculative decoding (with that
model and its own pacer). KV quantization (``kv_bits``) applies after every
chunk, as in ``generate_step``.
"""

from __future__ import annotations

import time
from typing import Any

from provider.engine.job import GenerationJob
from provider.engine.pacing import PrefillPacer
from provider.engine.runtime import Runtime


class Prefill:
    """A prompt being prefilled: its job, its KV cache, and how far it got.

    ``done`` counts the prompt tokens already in ``cache``: 0 for a fresh
    cache, more when the cache came from the prefix cache holding a prefix
    of the prompt. ``model`` and ``pacer`` are the model that fills the
    cache and the pacer that sizes its chunks; ``None``: the runtime's own
    (a draft model's cache is filled by the draft model, timed apart).
    """

    def __init__(
        self,
        job: GenerationJob,
        cache: list[Any],
        done: int = 0,
        *,
        model: Any = None,
        pacer: PrefillPacer | None = None,
    ) -> None:
        self.job = job
        self.cache = cache
        self.done = done
        self.model = model
        self.pacer = pacer

    @property
    def filled(self) -> bool:
        """Whether only the last prompt token is left (it gives the first token)."""
        return self.done >= len(self.job.prompt) - 1


def fill_chunk(rt: Runtime, fill: Prefill) -> None:
    """Put the next slice of ``fill``'s prompt into its cache (nothing when it is filled).

    The chunk's size comes from the pacer and its time goes back to it. MLX
    computes lazily and a batched decode step may still be running on the
    stream, so the stream is synchronised before the clock starts: the time
    is the chunk's own. Every chunk counts in ``prefill_chunks`` (and calls
    the step hook); only the main model's count in ``prefill_tokens``.
    """
    import mlx.core as mx
    from mlx_lm.generate import maybe_quantize_kv_cache

    job = fill.job
    rest = len(job.prompt) - 1 - fill.done
    if rest <= 0:
        return
    model = rt.model if fill.model is None else fill.model
    pacer = rt.pacer if fill.pacer is None else fill.pacer
    n = pacer.chunk(rest)
    mx.synchronize(rt.stream)
    start = time.perf_counter()
    model(mx.array(job.prompt[fill.done : fill.done + n])[None], cache=fill.cache)
    maybe_quantize_kv_cache(fill.cache, rt.quantized_kv_start, rt.kv_group_size, rt.kv_bits)
    mx.eval([c.state for c in fill.cache])
    pacer.record(n, time.perf_counter() - start)
    mx.clear_cache()
    fill.done += n
    job.stats.prefill_chunks += 1
    if fill.model is None:
        job.stats.prefill_tokens += n
    rt.step_done(job, "prefill")


def first_token(rt: Runtime, fill: Prefill) -> tuple[int, Any]:
    """Run the last prompt token through the filled cache: the first completion token.

    Returns the token and its step's log-probabilities. The request's logits
    processors see the whole prompt, the part that came from the prefix
    cache included, as in :func:`mlx_lm.generate.generate_step`.
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
