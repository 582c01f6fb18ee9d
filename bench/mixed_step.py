"""Would a mixed prefill+decode step pay on this machine? Forward-pass costs by shape.

While a newcomer's prompt is prefilled in slices, the running requests need
a decode step between slices. The scheduler runs them one after the other:
a decode step of ``b`` running requests (a ``[b, 1]`` forward over their
batched KV cache), then a chunk of ``n`` prompt tokens (``[1, n]``).
Sarathi-Serve and vLLM instead put both through the model as one batch. What
one forward pass costs for each shape tells whether that can pay:

- ``separate``: ``[b, 1]`` then ``[1, n]``: what the scheduler does;
- ``one_sequence``: ``[1, n + b]``, the cost of the linear layers of an ideal
  ragged mixed batch (every token once; attention at these lengths is a
  small part): the floor any mixed step could reach;
- ``padded``: ``[b + 1, n]``, a mixed step built from mlx-lm's batched
  caches, where each decode row is padded to the chunk's length.

A mixed step can only pay if ``one_sequence`` is clearly below ``separate``.
Each shape is timed ``--repeats`` times in interleaved rounds after a
warm-up, over a context of ``--context`` tokens already in the cache, and the
median is reported (milliseconds).

Prints ONE JSON line on stdout; progress goes to stderr.

    python bench/mixed_step.py --size small --quantize
    python bench/mixed_step.py --model ~/models/SmolLM2-135M-Instruct
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay


def log(text: str) -> None:
    print(f"[mixed_step] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    relay.add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--chunks", default="4,8,16,32,64", help="chunk sizes n")
    parser.add_argument("--running", default="1,4", help="running requests b")
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_lm
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    chunks = [int(x) for x in args.chunks.split(",")]
    running = [int(x) for x in args.running.split(",")]
    load_before = os.getloadavg()
    with relay.model_dir(args) as path:
        model, _ = load(str(path))
        vocab = model.args.vocab_size
        context = mx.random.randint(0, vocab, (1, args.context))

        caches: dict[int, list[Any]] = {}

        def cache(batch: int) -> list[Any]:
            if batch not in caches:
                c = make_prompt_cache(model)
                model(mx.repeat(context, batch, axis=0), cache=c)
                mx.eval([x.state for x in c])
                caches[batch] = c
            return caches[batch]

        def forward(batch: int, length: int) -> float:
            """One forward pass of ``[batch, length]`` over the context; the cache is restored."""
            c = cache(batch)
            x = mx.random.randint(0, vocab, (batch, length))
            mx.eval(x)
            start = time.perf_counter()
            y = mx.argmax(model(x, cache=c)[:, -1, :], axis=-1)
            mx.eval(y, [s.state for s in c])
            elapsed = time.perf_counter() - start
            for s in c:
                s.trim(length)
            return elapsed

        shapes = sorted(
            {(b, 1) for b in running}
            | {(1, n) for n in chunks}
            | {(1, n + b) for n in chunks for b in running}
            | {(b + 1, n) for n in chunks for b in running}
        )
        log(f"{len(shapes)} shapes, {args.repeats} rounds")
        for shape in shapes:
            forward(*shape)
        times: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
        for _ in range(args.repeats):
            for shape in shapes:
                times[shape].append(forward(*shape))
        ms = {s: 1000 * statistics.median(v) for s, v in times.items()}

        rows = []
        for b in running:
            for n in chunks:
                separate = ms[(b, 1)] + ms[(1, n)]
                rows.append(
                    {
                        "running": b,
                        "chunk": n,
                        "decode_ms": round(ms[(b, 1)], 2),
                        "chunk_ms": round(ms[(1, n)], 2),
                        "separate_ms": round(separate, 2),
                        "one_sequence_ms": round(ms[(1, n + b)], 2),
                        "padded_ms": round(ms[(b + 1, n)], 2),
                        "one_sequence_vs_separate": round(ms[(1, n + b)] / separate, 3),
                        "padded_vs_separate": round(ms[(b + 1, n)] / separate, 3),
                    }
                )
        result = {
            "model": str(path) if args.model else path.name,
            "device": str(mx.default_device()),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "context": args.context,
            "repeats": args.repeats,
            "ms_per_shape": {f"{b}x{n}": round(v, 2) for (b, n), v in sorted(ms.items())},
            "rows": rows,
            "median_one_sequence_vs_separate": round(
                statistics.median(r["one_sequence_vs_separate"] for r in rows), 3
            ),
            "median_padded_vs_separate": round(
                statistics.median(r["padded_vs_separate"] for r in rows), 3
            ),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
