"""What one response chunk costs to put on the wire: v1 plain against v2 sealed.

The same streamed chunk (one SSE event, one short token) is built ``--frames``
times the way the session builds it: v1 encodes an
``inference_response_chunk``; v2 also wraps the data in the chunk plaintext
envelope, seals it with AES-256-GCM under a fresh session key (AAD, nonce,
four base64url fields) and encodes the ``encrypted`` frame. The two
alternate ``--rounds`` times so the host's drift cancels. Prints ONE JSON
line: median microseconds per frame and bytes per frame for each.

    python bench/seal_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from provider.coordinator import tier2
from provider.coordinator.messages import (
    EncryptedChunk,
    InferenceResponseChunk,
    encode,
)

PROVIDER_ID = "mp-" + "a" * 32
ASSIGNED_ID = "6f1c0b6e-0000-4000-8000-000000000000"
EVENT = {
    "id": "chatcmpl-0123456789abcdef",
    "object": "chat.completion.chunk",
    "created": 1_767_225_600,
    "model": "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    keys = tier2.derive_keys(
        os.urandom(32), PROVIDER_ID, ASSIGNED_ID, os.urandom(32), os.urandom(32)
    )
    leg = tier2.EncryptedLeg(keys, PROVIDER_ID, ASSIGNED_ID, chunk_envelope=True)
    data = "data: " + json.dumps(EVENT, separators=(",", ":")) + "\n\n"

    def v1(seq: int) -> bytes:
        return encode(InferenceResponseChunk(request_id="req-1", seq=seq, data=data))

    def v2(seq: int) -> bytes:
        msg = InferenceResponseChunk(request_id="req-1", seq=seq, data=data)
        plaintext = leg.chunk_plaintext(msg.seq, msg.data)
        enc = leg.seal("inference_response_chunk", msg.request_id, True, plaintext)
        return encode(EncryptedChunk(request_id=msg.request_id, enc=enc))

    def run(build: Callable[[int], bytes]) -> tuple[float, int]:
        start = time.perf_counter()
        for seq in range(args.frames):
            frame = build(seq)
        return (time.perf_counter() - start) / args.frames * 1e6, len(frame)

    us: dict[str, list[float]] = {"v1": [], "v2": []}
    size: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, build in (("v1", v1), ("v2", v2)):
            cost, size[name] = run(build)
            us[name].append(cost)
    print(
        json.dumps(
            {
                "frames": args.frames,
                "rounds": args.rounds,
                "v1_us_per_frame": round(statistics.median(us["v1"]), 2),
                "v2_us_per_frame": round(statistics.median(us["v2"]), 2),
                "v1_bytes_per_frame": size["v1"],
                "v2_bytes_per_frame": size["v2"],
            }
        )
    )


if __name__ == "__main__":
    main()
