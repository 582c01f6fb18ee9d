"""What the generation thread owns once the model is loaded, and the helpers both schedulers share.

A :class:`Runtime` is made on the generation thread after loading and used
only there: the model, the tokenizer, the MLX stream, the command queue the
event loop submits jobs through, and the stop flag; the prefill pacers and
the inter-token gap window (which the event loop may read); and where a
request's KV cache comes from and goes to: the prefix cache
(:mod:`.prompt_cache`), the memory book (:mod:`.capacity`), KV quantization
and speculative decoding (:mod:`.speculative`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from provider.engine import EngineError
from provider.engine.capacity import Capacity
from provider.engine.job import GenerationJob, RequestStats, StepKind
from provider.engine.pacing import GapWindow, PrefillPacer
from provider.engine.prompt_cache import MISS, Hit, PromptCache, cache_length
from provider.engine.sampling import Sampler, make_sampler
from provider.engine.speculative import (
    LookupCosts,
    LookupStats,
    eligible,
    lookup_generate_step,
)

log = logging.getLogger("mlx_provider.engine")

StepHook = Callable[[RequestStats, StepKind], None]


@dataclass(eq=False)
class Runtime:
    """The generation thread's state and settings (see the module docstring).

    ``commands`` carries jobs, and ``None`` for "stop"; ``hook()`` returns
    the current step hook (tests may set it at any time). ``pacer`` sizes
    prefill chunks (``prefill_step_size`` is its upper bound), and
    ``draft_pacer`` the draft model's; ``gaps`` collects every request's
    inter-token gaps.
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
    prompt_cache: PromptCache | None = None
    capacity: Capacity | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000
    draft_model: Any = None
    draft_pacer: PrefillPacer | None = None
    num_draft_tokens: int = 3
    lookup: LookupCosts | None = None

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

    # -- where a request's KV cache comes from and goes to ---------------------

    def kv_args(self) -> dict[str, Any]:
        """KV quantization settings, as mlx-lm's generate functions take them."""
        return {
            "kv_bits": self.kv_bits,
            "kv_group_size": self.kv_group_size,
            "quantized_kv_start": self.quantized_kv_start,
        }

    def fetch(self, job: GenerationJob, *, draft: bool = False) -> Hit:
        """The KV cache ``job`` starts from: its longest cached prefix, else a new one.

        The hit's ``tokens`` prompt tokens are already in the cache (and in
        ``job.stats.cached_tokens``); ``draft`` also asks for the draft
        model's cache (a new one when the entry has none).
        """
        from mlx_lm.models.cache import make_prompt_cache

        hit = MISS
        if self.prompt_cache is not None and self.prompt_cache.enabled and job.use_cache:
            try:
                hit = self.prompt_cache.fetch(job.prompt, draft=draft)
            except Exception:
                log.exception("%s: prompt cache lookup failed; prefilling it all", job.request_id)
                hit = MISS
        job.stats.cached_tokens = hit.tokens
        cache = hit.cache if hit.cache is not None else make_prompt_cache(self.model)
        if draft and hit.draft is None and self.draft_model is not None:
            # The entry has no draft cache: the draft model starts from the beginning.
            return Hit(cache, make_prompt_cache(self.draft_model), hit.tokens, 0)
        return Hit(cache, hit.draft, hit.tokens, hit.draft_tokens)

    def keep(
        self,
        job: GenerationJob,
        cache: list[Any] | None,
        tokens: Sequence[int],
        *,
        draft: list[Any] | None = None,
    ) -> None:
        """Store ``cache`` in the prefix cache under the tokens it holds.

        ``tokens`` are the prompt and then every token generated; the cache
        holds the first ``offset`` of them (fewer when a cancel cut the
        prefill, or speculation rewound it). Never fails the request.
        """
        store = self.prompt_cache
        if store is None or cache is None or not store.enabled or not job.use_cache:
            return
        try:
            n = cache_length(cache)
            if n is None:
                n = len(tokens)
            if draft is not None:
                # Speculation may leave the draft a token behind: keep both at its length.
                n_draft = cache_length(draft)
                if n_draft is None:
                    draft = None
                else:
                    n = min(n, n_draft)
            if n <= job.stats.cached_tokens or n > len(tokens):
                return  # nothing the cache does not have already, or not ours to key
            limit = None
            if self.capacity is not None:
                limit = self.capacity.budget - self.capacity.reserved_except(job.request_id)
            store.store(tokens[:n], cache, draft=draft, conversation=job.conversation, limit=limit)
        except Exception:
            log.exception("%s: could not store the KV cache", job.request_id)

    def keep_batched(
        self,
        generator: Any,
        uids: Sequence[int],
        jobs: Mapping[int, GenerationJob],
        ended: Mapping[int, Any] | None = None,
    ) -> None:
        """:meth:`keep` for requests in a BatchGenerator, before they are removed from it.

        ``ended`` maps the uids the generator finished itself to their
        responses, which carry the extracted cache and tokens.
        """
        store = self.prompt_cache
        if store is None or not store.enabled or not uids:
            return
        ended = ended or {}
        try:
            extracted = generator.extract_cache([u for u in uids if u not in ended])
        except Exception:
            log.exception("could not extract KV caches from the batch")
            extracted = {}
        for uid in uids:
            job = jobs.get(uid)
            if job is None:
                continue
            if uid in ended:
                cache, tokens = ended[uid].prompt_cache, ended[uid].all_tokens
            elif uid in extracted:
                cache, tokens = extracted[uid]
            else:
                continue
            self.keep(job, cache, tokens or [])

    def admit(self, job: GenerationJob, *, alone: bool = False) -> bool:
        """Reserve ``job``'s KV memory if it fits beside the running requests.

        ``alone`` (nothing else runs) always admits: a request that does not
        fit alone was refused before it was queued, so this only keeps a
        stale book from stalling the queue. Admitting takes back from the
        prefix cache what the reservation needs.
        """
        capacity = self.capacity
        if capacity is None:
            return True
        context = len(job.prompt) + job.max_tokens
        if not capacity.admit(job.request_id, context):
            if not alone:
                return False
            capacity.admitted[job.request_id] = context
            capacity.blocked = None
        if self.prompt_cache is not None:
            self.prompt_cache.evict_to(capacity.budget - capacity.reserved)
        return True

    def speculation(
        self, job: GenerationJob, cache: list[Any]
    ) -> Literal["draft", "lookup"] | None:
        """How ``job`` decodes: with the draft model, with prompt lookup, or plainly."""
        if not eligible(job, cache):
            return None
        if self.draft_model is not None:
            return "draft"
        if self.lookup is not None:
            return "lookup"
        return None

    def token_steps(
        self,
        job: GenerationJob,
        mode: Literal["draft", "lookup"] | None,
        cache: list[Any],
        draft: list[Any] | None = None,
    ) -> Generator[tuple[int, Any, bool], None, None]:
        """``job``'s tokens once ``cache`` holds its prompt but the last token:
        ``(token, logprobs, from_draft)``.

        The scheduler prefills (:mod:`.prefill`, in time slices) and picks
        ``mode`` (:meth:`speculation`); with ``"draft"``, ``draft`` is the
        draft model's cache, filled as far. Then plainly through
        :func:`mlx_lm.generate.generate_step` (from the last prompt token),
        or speculatively: mlx-lm's speculative generator or prompt lookup.
        Sets ``job.stats.speculation``, and ``drafted``/``accepted`` as it
        goes.
        """
        import mlx.core as mx
        from mlx_lm.generate import generate_step, speculative_generate_step

        job.stats.speculation = mode
        kv = self.kv_args()
        last = mx.array(job.prompt[-1:])
        if mode is None:
            processors = job.logits_processors or None
            if processors and len(job.prompt) > 1:
                # They read the tokens so far, and the prefilled ones never
                # go through generate_step: put them back in front.
                prefix = mx.array(job.prompt[:-1])
                processors = [_after(prefix, p) for p in processors]
            steps = generate_step(
                last,
                self.model,
                self.stream,
                max_tokens=job.max_tokens,
                sampler=job.sampler,
                logits_processors=processors,
                prefill_step_size=self.prefill_step_size,
                prompt_cache=cache,
                **kv,
            )
            return _plain(steps)
        if mode == "draft":
            assert draft is not None
            # mlx-lm quantizes a copy of this list: with kv_bits, ``cache``
            # keeps the layers as they were at the switch (consistent, so the
            # prefix cache keeps that much).
            drafts = speculative_generate_step(
                last,
                self.model,
                self.draft_model,
                self.stream,
                num_draft_tokens=self.num_draft_tokens,
                max_tokens=job.max_tokens,
                sampler=job.sampler,
                prompt_cache=cache + draft,
                **kv,
            )
            return _counted(drafts, job.stats, self.num_draft_tokens)
        assert self.lookup is not None
        lookup = LookupStats()
        steps = lookup_generate_step(
            job.prompt,
            self.model,
            cache,
            self.stream,
            sampler=job.sampler,
            max_tokens=job.max_tokens,
            costs=self.lookup,
            stats=lookup,
            **kv,
        )
        return _looked_up(steps, job.stats, lookup)

    def finished(self, job: GenerationJob) -> None:
        stats = job.stats
        if stats.finished_at is None:
            stats.finished_at = time.perf_counter()
        capacity = self.capacity
        if capacity is not None:
            capacity.release(job.request_id)
            if stats.finish_reason in ("stop", "length"):
                prefill_s = None
                if stats.first_token_at is not None and stats.started_at is not None:
                    prefill_s = stats.first_token_at - stats.started_at
                capacity.observe(
                    prefilled=stats.prompt_tokens - stats.cached_tokens,
                    prefill_s=prefill_s,
                    decode_tps=stats.decode_tps,
                    completion=stats.completion_tokens,
                    limit=stats.max_tokens,
                )
        job.mark_ended()
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


Steps = Generator[tuple[int, Any, bool], None, None]


def _plain(steps: Generator[tuple[Any, Any], None, None]) -> Steps:
    try:
        for token, logprobs in steps:
            yield int(token), logprobs, False
    finally:
        steps.close()


def _counted(steps: Steps, stats: RequestStats, num_draft: int) -> Steps:
    """Count a draft model's proposals: a round yields its accepted drafts, then one
    token of the model's own (so drafted is an upper bound at the very end)."""
    try:
        for token, logprobs, from_draft in steps:
            if from_draft:
                stats.accepted += 1
            else:
                stats.drafted += num_draft
            yield int(token), logprobs, from_draft
    finally:
        steps.close()


def _looked_up(steps: Steps, stats: RequestStats, lookup: LookupStats) -> Steps:
    try:
        yield from steps
    finally:
        steps.close()
        stats.drafted, stats.accepted = lookup.drafted, lookup.accepted


def _after(prefix: Any, processor: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``processor`` seeing ``prefix`` before the tokens it is given."""
    import mlx.core as mx

    def call(tokens: Any, logits: Any) -> Any:
        return processor(mx.concatenate([prefix, tokens.astype(prefix.dtype)]), logits)

    return call
