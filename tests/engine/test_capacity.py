"""Capacity arithmetic, pure: KV bytes per request, fitting a budget, waits."""

from __future__ import annotations

import pytest

from provider.engine.capacity import (
    KV_STEP,
    Capacity,
    KvShape,
    Live,
    batch_bytes,
    default_budget,
    estimate_wait_s,
)

SHAPE = KvShape(bytes_per_token=1000.0)


def test_request_bytes_round_up_to_the_cache_step() -> None:
    assert SHAPE.request_bytes(1) == KV_STEP * 1000
    assert SHAPE.request_bytes(KV_STEP) == KV_STEP * 1000
    assert SHAPE.request_bytes(KV_STEP + 1) == 2 * KV_STEP * 1000
    assert KvShape(1000.0, fixed_bytes=7).request_bytes(10) == KV_STEP * 1000 + 7


def test_quantized_kv_costs_less_past_the_switch() -> None:
    shape = KvShape(1000.0, itemsize=2, kv_bits=4, kv_group_size=64, quantized_start=512)
    assert shape.request_bytes(512) == SHAPE.request_bytes(512)
    long = 16 * 1024
    # 4 bits plus a float16 scale and bias per 64 elements: 0.3125 of float16.
    expected = 512 * 1000 + long * 1000 * (0.5 + 4 / 64) / 2
    assert shape.request_bytes(long) == pytest.approx(expected, rel=1e-6)
    assert shape.request_bytes(long) < SHAPE.request_bytes(long) / 2


def test_max_tokens_is_the_longest_context_that_fits() -> None:
    budget = 10 * KV_STEP * 1000
    assert SHAPE.max_tokens(budget) == 10 * KV_STEP
    assert SHAPE.request_bytes(SHAPE.max_tokens(budget)) <= budget
    assert SHAPE.request_bytes(SHAPE.max_tokens(budget) + 1) > budget
    assert SHAPE.max_tokens(KV_STEP * 1000 - 1) == 0
    assert SHAPE.max_tokens(10**15) > 10**9


def test_a_batch_pads_every_request_to_the_longest() -> None:
    assert batch_bytes(SHAPE, []) == 0
    assert batch_bytes(SHAPE, [100, 3000]) == 2 * SHAPE.request_bytes(3000)


def test_default_budget() -> None:
    gib = 1 << 30
    assert default_budget(16 * gib, None, 2 * gib, gib) == 9 * gib  # 3/4 of RAM
    assert default_budget(16 * gib, 10 * gib, 2 * gib, 0) == 8 * gib  # MLX's recommendation
    assert default_budget(4 * gib, None, 8 * gib, 0) == 0


def test_capacity_admits_in_turn_and_releases() -> None:
    one = SHAPE.request_bytes(1000)
    cap = Capacity(SHAPE, budget=2 * one, sequential=False, decode_tps=10)
    assert cap.admit("a", 1000) and cap.admit("a", 1000)  # idempotent
    assert cap.reserved == one
    # Two of them: each padded to the longer one.
    assert cap.admit("b", 500)
    assert cap.reserved == 2 * one
    assert not cap.admit("c", 10)
    assert cap.blocked == "c"
    assert cap.reserved_except("a") == SHAPE.request_bytes(500)
    cap.release("a")
    assert cap.admit("c", 10) and cap.blocked is None
    cap.release("b")
    cap.release("c")
    assert cap.reserved == 0


def test_sequential_capacity_counts_one_request() -> None:
    cap = Capacity(SHAPE, budget=SHAPE.request_bytes(1000), sequential=True, decode_tps=10)
    assert cap.fits(1000) and not cap.fits(1000 + KV_STEP)
    assert cap.admit("a", 1000) and cap.admit("b", 1000)
    assert cap.reserved == SHAPE.request_bytes(1000)


def test_speeds_are_averaged() -> None:
    cap = Capacity(SHAPE, budget=1 << 40, sequential=False, decode_tps=100)
    assert cap.prefill_tps == 100
    for _ in range(50):
        cap.observe(prefilled=1000, prefill_s=1.0, decode_tps=50, completion=10, limit=100)
    assert cap.prefill_tps == pytest.approx(1000, rel=0.01)
    assert cap.decode_tps == pytest.approx(50, rel=0.01)
    assert cap.length_ratio == pytest.approx(0.1, rel=0.01)


def wait(live: list[Live], context: int = 100, **kw: object) -> float:
    options: dict = {
        "shape": SHAPE,
        "budget": 1 << 40,
        "slots": 4,
        "sequential": False,
        "prefill_tps": 100.0,
        "decode_tps": 10.0,
    }
    options.update(kw)
    return estimate_wait_s(live, context, **options)


def test_no_wait_when_idle() -> None:
    assert wait([]) == 0.0


def test_sequential_wait_is_all_the_work_ahead() -> None:
    live = [Live(300, 0, 50, True), Live(300, 200, 100, False)]
    # 50 tokens at 10/s, then 200 prompt tokens at 100/s and 100 at 10/s.
    assert wait(live, sequential=True) == pytest.approx(5 + 2 + 10)
    assert wait(live, sequential=True, length_ratio=0.5) == pytest.approx(2.5 + 2 + 5)


def test_batched_wait_for_prompts_ahead_only_while_slots_and_memory_last() -> None:
    live = [Live(300, 0, 50, True), Live(300, 200, 100, True)]
    assert wait(live) == pytest.approx(2.0)  # the one prompt ahead


def test_batched_wait_for_a_slot() -> None:
    live = [Live(300, 0, d, True) for d in (50, 20, 80, 30)]
    assert wait(live) == pytest.approx(2.0)  # the soonest to end: 20 tokens at 10/s


def test_batched_wait_for_memory() -> None:
    budget = batch_bytes(SHAPE, [1000, 1000, 1000])
    live = [Live(1000, 0, d, True) for d in (50, 20)]
    assert wait(live, 1000, budget=budget) == 0.0  # three fit
    # A longer one pads the batch: one must end, or both when it only fits alone.
    assert wait(live, 2000, budget=batch_bytes(SHAPE, [2000, 2000])) == pytest.approx(2.0)
    assert wait(live, 2000, budget=batch_bytes(SHAPE, [2000])) == pytest.approx(5.0)
    # One must end: the soonest.
    assert wait(live, 1000, budget=batch_bytes(SHAPE, [1000, 1000])) == pytest.approx(2.0)
