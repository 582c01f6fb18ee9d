"""Grammar libraries for constrained decoding, measured here: compile time, per-token cost.

For each library (llguidance, outlines-core, xgrammar) and each JSON Schema:

- ``tokenizer_ms``: one-time preparation for the model's vocabulary;
- ``compile_ms``: schema to a ready matcher, cold (no compile cache), median;
- ``token_us``: per generated token, computing the allowed-token mask and
  advancing the matcher by the sampled token, walking a valid document token
  by token (mean and p99 over every token of every round).

Rounds are interleaved (library A, B, C, then again) so background load hits
each alike. Also measured once: ``apply_us``, turning a bitmask into an MLX
mask over the logits (``provider.engine.sampling.GrammarProcessor``'s way).

xgrammar imports torch at load (``Requires-Dist: torch``, and triton on
Linux); where torch is missing it is reported as not importable.

With ``--model DIR`` the cost in real decoding is measured too: the MLX
engine decodes a ``person`` document greedily under its grammar, then the
same number of tokens unconstrained (EOS masked), in interleaved rounds;
``decode_tps`` of each and the ratio.

Usage::

    python bench/grammar.py --tokenizer DIR [--model DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "email": {"type": "string"},
                "pets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "kind": {"enum": ["cat", "dog", "fish"]},
                            "name": {"type": "string"},
                        },
                        "required": ["kind", "name"],
                        "additionalProperties": False,
                    },
                },
                "verified": {"type": "boolean"},
            },
            "required": ["name", "age", "email", "pets", "verified"],
            "additionalProperties": False,
        },
        {
            "name": "Ada Lovelace",
            "age": 36,
            "email": "ada@example.org",
            "pets": [
                {"kind": "cat", "name": "Babbage"},
                {"kind": "dog", "name": "Analytical Engine"},
            ],
            "verified": True,
        },
    ),
    "tool_call": (
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": name},
                        "arguments": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string"},
                                "unit": {"enum": ["celsius", "fahrenheit"]},
                                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                            },
                            "required": ["city", "unit", "days"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name in ("get_weather", "get_forecast", "get_alerts")
            ]
        },
        {"name": "get_forecast", "arguments": {"city": "Reykjavik", "unit": "celsius", "days": 5}},
    ),
    "wide": (
        {
            "type": "object",
            "properties": {
                f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(40)
            },
            "required": [f"field_{i}" for i in range(40)],
            "additionalProperties": False,
        },
        {f"field_{i}": [f"value {i}", i * 7, i % 2 == 0][i % 3] for i in range(40)},
    ),
}


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # ", " and ": ": how models write JSON


class Lib:
    name = ""

    def prepare(self, hf: Any, vocab_size: int, eos: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def mask(self, m: Any) -> None: ...
    def consume(self, m: Any, token: int) -> None: ...


class Llguidance(Lib):
    name = "llguidance"

    def prepare(self, hf: Any, vocab_size: int, eos: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos)

    def compile(self, schema: dict[str, Any]) -> Any:
        style = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.llg.LLMatcher.grammar_from_lark(
            "start: %json " + json.dumps({**schema, "x-guidance": style})
        )
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def mask(self, m: Any) -> None:
        m.compute_bitmask()

    def consume(self, m: Any, token: int) -> None:
        assert m.consume_token(token), m.get_error()


class OutlinesCore(Lib):
    name = "outlines-core"

    def prepare(self, hf: Any, vocab_size: int, eos: int) -> None:
        import llguidance.hf
        import numpy as np
        import outlines_core as oc

        self.oc = oc
        self.np = np
        # Token bytes from the tokenizer's own byte-level table.
        table = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos)
        vocab: dict[bytes, list[int]] = {}
        for i in range(len(hf)):
            if i == eos or table.is_special_token(i):
                continue
            vocab.setdefault(table.decode_bytes([i]), []).append(i)
        self.vocab = oc.Vocabulary(eos, vocab)
        self.bitmask = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, m: Any) -> None:
        m.write_mask_into(self.bitmask.ctypes.data, self.bitmask.size, 4)

    def consume(self, m: Any, token: int) -> None:
        m.advance(token)


class Xgrammar(Lib):
    name = "xgrammar"

    def prepare(self, hf: Any, vocab_size: int, eos: int) -> None:
        import numpy as np
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.bitmask = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    def compile(self, schema: dict[str, Any]) -> Any:
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m: Any) -> None:
        m.fill_next_token_bitmask(self.bitmask)

    def consume(self, m: Any, token: int) -> None:
        assert m.accept_token(token)


LIBS = {lib.name: lib for lib in (Llguidance, OutlinesCore, Xgrammar)}


def apply_cost(vocab_size: int, n: int = 200) -> float:
    """Microseconds to turn a bitmask into an MLX mask and apply it (the product's way)."""
    import mlx.core as mx
    import numpy as np

    words = np.random.default_rng(0).integers(0, 2**32, (vocab_size + 31) // 32, dtype=np.uint32)
    logits = mx.zeros((1, vocab_size))
    mx.eval(logits)
    t = time.perf_counter()
    for _ in range(n):
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
        out = mx.where(mx.array(allowed), logits, -float("inf"))
        mx.eval(out)
    return (time.perf_counter() - t) / n * 1e6


async def decode_cost(model: str, rounds: int) -> dict[str, Any]:
    """Decode tokens/s with and without a grammar, same tokens count, interleaved rounds."""
    import threading

    from provider.engine.mlx import MlxEngine
    from provider.openai.request import decode_chat_request

    engine = MlxEngine(model, max_concurrency=1, ignore_eos=True)
    await engine.load()
    schema = SCHEMAS["person"][0]
    messages = [{"role": "user", "content": "Fill in the form."}]
    constrained = decode_chat_request(
        json.dumps(
            {
                "messages": messages,
                "max_tokens": 1000,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": schema},
                },
            }
        )
    )
    tps: dict[str, list[float]] = {"grammar": [], "plain": []}
    try:
        for _ in range(rounds):
            async for _ in engine.generate(constrained, threading.Event(), request_id="g"):
                pass
            stats = engine.last_stats["g"]
            n = stats.completion_tokens
            tps["grammar"].append(stats.decode_tps or 0.0)
            plain = decode_chat_request(json.dumps({"messages": messages, "max_tokens": n}))
            async for _ in engine.generate(plain, threading.Event(), request_id="p"):
                pass
            tps["plain"].append(engine.last_stats["p"].decode_tps or 0.0)
    finally:
        await engine.close()
    ratios = [g / p for g, p in zip(tps["grammar"], tps["plain"], strict=True) if p]
    return {
        "tokens": n,
        "grammar_tps": [round(x, 1) for x in tps["grammar"]],
        "plain_tps": [round(x, 1) for x in tps["plain"]],
        # Paired within a round: the load changes between rounds, not within one.
        "ratio_per_round": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a model directory with tokenizer.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--model", help="an mlx-lm model directory: measure decoding with the grammar")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.tokenizer)
    config = Path(args.tokenizer) / "config.json"
    vocab_size = (
        json.loads(config.read_text()).get("vocab_size", len(hf)) if config.exists() else len(hf)
    )
    eos = hf.eos_token_id
    result: dict[str, Any] = {
        "tokenizer": str(args.tokenizer),
        "vocab_size": vocab_size,
        "load": os.getloadavg(),
        "rounds": args.rounds,
        "libs": {},
    }
    libs: list[Lib] = []
    for name in args.libs.split(","):
        lib = LIBS[name]()
        try:
            t = time.perf_counter()
            lib.prepare(hf, vocab_size, eos)
            result["libs"][name] = {"tokenizer_ms": round((time.perf_counter() - t) * 1e3, 1)}
            libs.append(lib)
        except Exception as exc:  # a library that does not install or import here
            result["libs"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    tokens = {k: hf.encode(dumps(doc), add_special_tokens=False) for k, (_, doc) in SCHEMAS.items()}
    compile_ms: dict[tuple[str, str], list[float]] = {}
    token_us: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for schema_name, (schema, _) in SCHEMAS.items():
            for lib in libs:
                t = time.perf_counter()
                try:
                    m = lib.compile(schema)
                except Exception as exc:
                    result["libs"][lib.name].setdefault("errors", {})[schema_name] = str(exc)
                    continue
                compile_ms.setdefault((lib.name, schema_name), []).append(
                    (time.perf_counter() - t) * 1e3
                )
                per = token_us.setdefault((lib.name, schema_name), [])
                for tok in tokens[schema_name]:
                    t = time.perf_counter()
                    lib.mask(m)
                    lib.consume(m, tok)
                    per.append((time.perf_counter() - t) * 1e6)
    for (name, schema_name), values in compile_ms.items():
        per = sorted(token_us[(name, schema_name)])
        result["libs"][name][schema_name] = {
            "compile_ms": round(statistics.median(values), 2),
            "token_us_mean": round(statistics.fmean(per), 1),
            "token_us_p99": round(per[int(0.99 * (len(per) - 1))], 1),
            "tokens": len(tokens[schema_name]),
        }
    result["apply_us"] = round(apply_cost(vocab_size), 1)
    print(json.dumps(result), file=sys.stderr, flush=True)  # survives a slow decode below
    if args.model:
        import asyncio

        result["decode"] = asyncio.run(decode_cost(args.model, args.rounds))
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
