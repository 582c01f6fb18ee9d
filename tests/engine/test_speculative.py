"""Speculative decoding: the pure parts (n-gram drafts, when lookup pays)."""

from __future__ import annotations

import math

from provider.engine.speculative import MARGIN, LookupCosts, LookupStats, NgramIndex


def test_ngram_index_drafts_what_followed_the_latest_earlier_occurrence() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 1, 2, 3])
    # Tail (1, 2, 3) occurred at the start, followed by 4, 5, 9.
    assert index.draft(3) == [4, 5, 9]
    assert index.draft(1) == [4]
    assert index.draft(0) == []
    index.append(4)
    # Tail (2, 3, 4): latest earlier occurrence is at 6, followed by 7, 8.
    assert index.draft(5) == [7, 8, 1, 2, 3]


def test_ngram_index_falls_back_to_shorter_ngrams_and_never_matches_its_own_tail() -> None:
    index = NgramIndex([5, 6, 7])
    assert index.draft(2) == []  # no earlier occurrence of anything
    index.append(6)
    assert index.draft(2) == [7, 6]  # (6,) occurred at 1
    assert NgramIndex([1]).draft(3) == []


def test_lookup_pays_only_when_verifying_is_cheaper_than_the_tokens_it_gives() -> None:
    # Verifying 3 drafts costs what one plain step does (Metal-like): it pays.
    cheap = LookupCosts(plain_s=0.010, verify_s=(0.010, 0.010, 0.011, 0.012))
    assert cheap.pays()
    assert cheap.best_draft(0.9) == 3
    assert cheap.best_draft(0.0) == 0
    # A forward pass costs as much per token as steps do (this CPU): never.
    linear = LookupCosts(plain_s=0.010, verify_s=(0.010, 0.020, 0.030, 0.040))
    assert not linear.pays()
    assert linear.best_draft(0.999) == 0
    # "on": drafting always wins.
    forced = LookupCosts(math.inf, (1.0,) * 4)
    assert forced.best_draft(0.0) == 3


def test_best_draft_weighs_expected_accepted_tokens() -> None:
    costs = LookupCosts(plain_s=0.010, verify_s=(0.010, 0.012, 0.014, 0.030))
    # At acceptance a, a round of k drafts yields (1 - a^(k+1)) / (1 - a) tokens.
    a = 0.8
    rates = [(1 - a ** (k + 1)) / (1 - a) / costs.verify_s[k] for k in range(1, 4)]
    best = max(range(3), key=lambda i: rates[i]) + 1
    assert costs.best_draft(a) == best
    assert rates[best - 1] > MARGIN / costs.plain_s


def test_acceptance_leans_on_the_prior_until_there_is_evidence() -> None:
    stats = LookupStats()
    assert 0.5 < stats.acceptance < 0.7
    stats.drafted, stats.accepted = 4, 0
    assert 0.2 < stats.acceptance < 0.6
    stats.drafted, stats.accepted = 100, 10
    assert stats.acceptance == 0.1
