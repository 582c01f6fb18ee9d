"""Prefill pacing as a pure function of measured speed, and the inter-token gap window."""

from __future__ import annotations

import itertools

import pytest

from provider.engine.pacing import (
    GapWindow,
    PrefillPacer,
    chunk_for_budget,
    percentile,
    size_bucket,
)


def test_size_buckets_are_powers_of_two() -> None:
    assert [size_bucket(n) for n in (1, 2, 3, 4, 7, 8, 511, 512)] == [0, 1, 1, 2, 2, 3, 8, 9]


def test_nothing_measured_means_one_token() -> None:
    assert chunk_for_budget({}, 0.1, 512) == 1


def test_the_largest_chunk_that_fits_its_measured_bucket() -> None:
    # 64-127 token chunks measured at 1 ms a token; 16-31 at 2 ms.
    rates = {4: 0.002, 6: 0.001}
    assert chunk_for_budget(rates, 0.080, 512) == 80  # bucket 6: 80 tokens x 1 ms
    # 50 ms: 50 tokens at 1 ms is too few for bucket 6; bucket 5 (never
    # measured) borrows bucket 4's 2 ms, and 25 tokens is too few for it too.
    assert chunk_for_budget(rates, 0.050, 512) == 25
    assert chunk_for_budget(rates, 0.040, 512) == 20


def test_a_size_never_timed_is_probed_once_when_it_may_fit() -> None:
    # One token alone costs 130 ms (a fixed cost per pass), so at 130 ms a
    # token two would not fit a 250 ms budget; but that rate is pessimistic
    # for two, so two tokens are tried (at most 1.5 budgets if it were right).
    assert chunk_for_budget({0: 0.130}, 0.250, 512) == 2
    assert chunk_for_budget({0: 0.200}, 0.250, 512) == 1  # 400 ms: too far over
    # Once measured, the bucket's own rate decides.
    assert chunk_for_budget({0: 0.130, 1: 0.100}, 0.250, 512) == 2
    assert chunk_for_budget({0: 0.130, 1: 0.140}, 0.250, 512) == 1
    # 100 tokens fit bucket 6's 1 ms; 128 (bucket 7, never timed) is probed.
    assert chunk_for_budget({4: 0.002, 6: 0.001}, 0.100, 512) == 128


def test_a_chunk_grows_at_most_one_bucket_beyond_what_was_timed() -> None:
    # A very fast 1-token measurement does not send 512 tokens through on trust.
    assert chunk_for_budget({0: 1e-6}, 0.1, 512) == 3
    assert chunk_for_budget({0: 1e-6, 1: 1e-6}, 0.1, 512) == 7
    assert chunk_for_budget({k: 1e-6 for k in range(5)}, 0.1, 512) == 63


def test_the_limit_bounds_every_chunk() -> None:
    rates = {k: 1e-6 for k in range(10)}
    assert chunk_for_budget(rates, 10.0, 512) == 512
    assert chunk_for_budget(rates, 10.0, 40) == 40
    assert chunk_for_budget(rates, 10.0, 1) == 1


def test_one_token_when_even_one_does_not_fit() -> None:
    assert chunk_for_budget({0: 0.5}, 0.1, 512) == 1
    assert chunk_for_budget({3: 0.5}, 0.1, 512) == 1


def test_pacer_off_uses_fixed_chunks() -> None:
    pacer = PrefillPacer(None, 512)
    assert pacer.chunk(2000) == 512
    assert pacer.chunk(100) == 100
    assert PrefillPacer(0.0, 512).slice_s is None


def test_pacer_seeds_from_decode_speed_only_before_measuring() -> None:
    pacer = PrefillPacer(0.1, 512)
    pacer.seed(0.030)  # 30 ms a decode step: 3 tokens fit 100 ms
    assert pacer.chunk(1000) == 3
    pacer.record(3, 0.030)
    pacer.seed(1.0)  # ignored: there is a measurement now
    assert pacer.rates[0] == 0.030


def test_a_buckets_rate_is_the_median_of_its_latest_measurements() -> None:
    pacer = PrefillPacer(0.1, 512, window=5)
    for seconds in (0.4, 0.4, 4.0, 0.4):  # 4-token chunks; one slowed down 10x
        pacer.record(4, seconds)
    assert pacer.rates[2] == pytest.approx(0.1)  # the outlier does not move it
    assert pacer.tokens_per_s == pytest.approx(10.0)  # the latest chunk's speed
    for _ in range(3):
        pacer.record(5, 1.0)  # the machine got slower for good: 0.2 s a token
    assert pacer.rates[2] == pytest.approx(0.2)
    pacer.record(0, 1.0)
    pacer.record(3, 0.0)
    assert set(pacer.rates) == {2}  # nothing learned from empty or untimed chunks


@pytest.mark.parametrize(
    ("fixed_s", "per_token_s", "budget_s", "expected"),
    [
        (0.0, 0.034, 0.25, 7),  # the 30M model on this CPU: linear, 34 ms a token
        (0.020, 0.0018, 0.100, 44),  # a GPU: a fixed cost per pass, then cheap tokens
        (0.001, 0.0001, 0.100, 512),  # fast: capped at the step size
        (0.200, 0.010, 0.100, 1),  # one token alone is over the budget
        (0.060, 0.070, 0.250, 2),  # a fixed cost that makes one token look slow
    ],
)
def test_pacer_converges_to_what_fits_the_slice(
    fixed_s: float, per_token_s: float, budget_s: float, expected: int
) -> None:
    pacer = PrefillPacer(budget_s, 512)
    pacer.seed(fixed_s + per_token_s)
    sizes = []
    for _ in range(30):
        n = pacer.chunk(100_000)
        sizes.append(n)
        pacer.record(n, fixed_s + per_token_s * n)
    assert sizes[-1] == expected
    # Over the budget only to probe a size bucket never timed: at most 1.5
    # budgets, once a bucket.
    over = [n for n in sizes if n > 1 and fixed_s + per_token_s * n > budget_s]
    assert all(fixed_s + per_token_s * n <= 1.5 * budget_s for n in over)
    assert len({size_bucket(n) for n in over}) == len(over)
    # And it gets there fast: sizes at most double from one chunk to the next.
    assert all(b <= 2 * a + 1 for a, b in itertools.pairwise(sizes))
    assert sizes[10] >= 0.9 * expected  # within 10% after 10 chunks


def test_pacer_adapts_when_the_machine_slows_down() -> None:
    pacer = PrefillPacer(0.1, 512)
    pacer.seed(0.001)
    for _ in range(20):
        pacer.record(pacer.chunk(10_000), 0.001 * pacer.last_chunk)  # type: ignore[operator]
    fast = pacer.last_chunk
    for _ in range(20):  # another process takes half the machine
        pacer.record(pacer.chunk(10_000), 0.002 * pacer.last_chunk)  # type: ignore[operator]
    assert fast == 100
    assert pacer.last_chunk == 50


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0


def test_gap_window_is_bounded_and_summarised() -> None:
    window = GapWindow(size=100)
    assert window.summary() == (0, None, None, None)
    for i in range(1, 201):
        window.add(i / 1000)
    samples, p50, p99, worst = window.summary()
    assert samples == 100 and window.total == 200
    assert (p50, p99, worst) == (0.150, 0.199, 0.200)
