"""5,000 random frames at the provider's handler, through the real socket.

Bytes, arbitrary JSON, and near-valid messages (a field dropped, a wrong
type, an unknown type, extra fields). Each must be answered (nak, end frame
or preflight_ack), except a well-formed message of an unknown type, which is
ignored (a nak ``unknown_message_type`` would take us off WebSocket routing),
and the session must stay up and end ready.

On the v2 encrypted leg a valid ``inference_request`` is sealed by the stub
(a plaintext one is refused with a ``tier2_*`` nak, on which the coordinator
closes the session: by design, so not fuzzed), near-valid ones are only
those that fail to decode, and a cancel for an unknown request is ignored
(an end frame for a request the coordinator does not hold would close it).
"""

from __future__ import annotations

import json
import random
from typing import Any

from coordinator_stub.app import CoordinatorStub

from .conftest import PID, provider_config, running
from .scripted_engine import ScriptedEngine

VALID: dict[str, dict[str, Any]] = {
    "cancel_request": {"request_id": "c", "reason": "buyer_disconnected"},
    "preflight": {"request_id": "p", "estimated_tokens": 10},
    "inference_request": {
        "request_id": "r",
        "stream": False,
        "body": json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    },
}
ANSWER = {
    "cancel_request": "inference_response_end",
    "preflight": "preflight_ack",
    "inference_request": "inference_response_end",
}


def junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-(2**63), 2**63)
    if kind == 1:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 2:
        return rng.choice([None, True, False, 1.5e308, -0.0])
    if kind == 3:
        return rng.random()
    if kind == 4:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": junk(rng, depth + 1) for i in range(rng.randrange(4))}


def make_frame(rng: random.Random, i: int, protocol: str) -> tuple[str | bytes, str]:
    """A frame and the answer type it must get ("nak" for every invalid one).

    On v2, ``("sealed", ...)`` stands for a valid request the stub seals.
    """
    choice = rng.randrange(6)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "nak"
    if choice == 1:
        return json.dumps(junk(rng)), "nak"
    if choice == 2:
        return json.dumps({"type": f"bogus_{rng.randrange(100)}", "x": junk(rng)}), "ignored"
    kind = rng.choice(list(VALID))
    msg: dict[str, Any] = {"type": kind, **VALID[kind], "request_id": f"f{i}"}
    # On the encrypted leg the body travels sealed: a plaintext frame without
    # one (or with a null one) decodes, and is refused with a tier2 nak.
    plain_body = protocol == "v1" or kind != "inference_request"
    if choice == 3:  # a required field missing
        fields = [k for k in VALID[kind] if k != "reason" and (plain_body or k != "body")]
        msg.pop(rng.choice(fields))
        return json.dumps(msg), "nak"
    if choice == 4:  # a field of the wrong type
        field = rng.choice(list(VALID[kind]))
        wrong = [[], {}, 3.5, None] if plain_body or field != "body" else [[], {}, 3.5]
        msg[field] = rng.choice(wrong) if field != "reason" else 7
        return json.dumps(msg), "nak"
    if not plain_body:
        return "sealed", ANSWER[kind]
    if protocol == "v2" and kind == "cancel_request":
        return json.dumps(msg), "ignored"  # no such request: no end frame on the leg
    msg["extra_field"] = junk(rng)  # valid, with an unknown field (ignored)
    return json.dumps(msg), ANSWER[kind]


async def test_5000_random_frames_all_answered_session_survives(
    stub: CoordinatorStub, protocol: str
) -> None:
    rng = random.Random(20261121)
    engine = ScriptedEngine(tokens=2, step_s=0.0)
    config = provider_config(stub, max_concurrency=4, protocol=protocol)
    async with running(config, engine) as run:
        await stub.wait_provider_state(PID, "ready")
        session = run.session
        expected: dict[str, int] = {"nak": 0, "inference_response_end": 0, "preflight_ack": 0}
        ignored = 0
        before = {k: len(stub.frames_received(PID, k)) for k in expected}
        for i in range(5000):
            frame, answer = make_frame(rng, i, protocol)
            if answer == "ignored":
                ignored += 1
            else:
                expected[answer] += 1
            if frame == "sealed":
                await stub.send_request(PID, VALID["inference_request"]["body"], request_id=f"f{i}")
            else:
                await stub.send_raw(PID, frame)

        def answered() -> bool:
            return all(
                len(stub.frames_received(PID, k)) - before[k] >= n for k, n in expected.items()
            )

        await stub.wait_for(answered, timeout=60, what="every frame answered")
        got = {k: len(stub.frames_received(PID, k)) - before[k] for k in expected}
        assert got == expected and ignored > 500
        naks = stub.frames_received(PID, "nak")
        assert not any(n.message.error.code == "unknown_message_type" for n in naks)
        await stub.wait_provider_state(PID, "ready")
        assert run.agent.session is session and stub.drops == []
        assert run.agent.state.in_flight == 0 and not run.task.done()
