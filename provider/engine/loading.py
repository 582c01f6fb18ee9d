"""Loading a model with mlx-lm and measuring it: what the generation thread does first.

Everything here runs on the generation thread, inside its MLX stream.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Context size assumed when neither the model config nor the caller gives one.
FALLBACK_CONTEXT_TOKENS = 4096


@dataclass(slots=True)
class LoadedModel:
    """A model as :func:`load_model` returns it."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    context_tokens: int
    load_ms: int


def load_model(
    model: str, *, trust_remote_code: bool, configured_context_tokens: int | None
) -> LoadedModel:
    """Load ``model`` (a directory or a repo id) with ``mlx_lm.load``.

    The context limit is the configured one capped by the model's
    ``max_position_embeddings``; either alone if only one is known; else
    :data:`FALLBACK_CONTEXT_TOKENS`.
    """
    from mlx_lm import load as mlx_load

    start = time.perf_counter()
    loaded, tokenizer, config = mlx_load(
        model, return_config=True, trust_remote_code=trust_remote_code
    )
    load_ms = int((time.perf_counter() - start) * 1000)
    model_context = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    configured = configured_context_tokens
    if model_context and configured:
        context = min(configured, int(model_context))
    else:
        context = int(configured or model_context or FALLBACK_CONTEXT_TOKENS)
    return LoadedModel(loaded, tokenizer, config, context, load_ms)


def make_eos_mask(model: Any, tokenizer: Any, config: dict[str, Any]) -> Any:
    """An additive logits mask: -inf at the EOS ids, 0 elsewhere."""
    import mlx.core as mx

    try:
        # Shapes are known without evaluating, so this costs no forward pass.
        vocab = model(mx.array([[0]])).shape[-1]
    except Exception:
        vocab = vocab_size(config) or len(tokenizer)
    mask = mx.zeros((vocab,))
    mask[mx.array(sorted(tokenizer.eos_token_ids))] = -float("inf")
    return mask


def measure_throughput(
    model: Any, stream: Any, prompt: list[int], eos_mask: Any, tokens: int
) -> float:
    """Decode tokens/s of one greedy stream over ``tokens`` tokens, after a short untimed run.

    ``eos_mask`` (or None) keeps EOS from ending the run early: the estimate
    needs every token.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    ids = mx.array(prompt)

    def sampler(logprobs: Any) -> Any:
        return mx.argmax(logprobs if eos_mask is None else logprobs + eos_mask, axis=-1)

    tps = 0.0
    for n in (4, tokens):
        first = last = time.perf_counter()
        for i, _ in enumerate(generate_step(ids, model, stream, max_tokens=n, sampler=sampler)):
            last = time.perf_counter()
            if i == 0:
                first = last
        if last > first:
            tps = (n - 1) / (last - first)
    return tps


def vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else None


def model_hash(path: Path) -> str:
    """sha256 of config.json plus the weight index (or weight file names and sizes).

    Cheap: it identifies a checkpoint without reading gigabytes of weights.
    """
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = path / name
        if file.exists():
            digest.update(name.encode() + b"\0" + file.read_bytes())
    weights = sorted(path.glob("*.safetensors"))
    digest.update(json.dumps([[w.name, w.stat().st_size] for w in weights]).encode())
    return "sha256:" + digest.hexdigest()


def logits_width(model: Any, config: dict[str, Any], tokenizer: Any) -> int:
    """How many token ids the model scores (its vocabulary, padding included)."""
    args = getattr(model, "args", None)
    for value in (
        getattr(args, "vocab_size", None),
        config.get("vocab_size"),
        (config.get("text_config") or {}).get("vocab_size"),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return len(tokenizer)
