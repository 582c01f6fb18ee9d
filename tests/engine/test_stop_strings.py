"""Stop-string matching on decoded text, token by token (no model)."""

from __future__ import annotations

import threading

import pytest

from provider.engine.job import GenerationJob as _Job
from provider.engine.job import RequestStats
from provider.engine.text import partial_stop_len as _partial_stop_len

EOS = 99


class PieceDetokenizer:
    """Token i decodes to pieces[i]."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.pending = ""

    def add_token(self, token: int) -> None:
        self.pending += self.pieces[token]

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        segment, self.pending = self.pending, ""
        return segment


def run(pieces: list[str], stop: list[str], max_tokens: int = 100) -> tuple[list[str], _Job]:
    """Feed every piece (then EOS if the job is still going); return the emitted texts."""
    job = _Job(
        request_id="unit",
        prompt=[1],
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        stop=stop,
        cancel=threading.Event(),
        loop=None,
        stats=RequestStats("unit", 1, max_tokens),
    )
    job.detokenizer = PieceDetokenizer(pieces)
    job.eos = frozenset({EOS})
    job.record_tokens = True
    emitted = []
    for token in [*range(len(pieces)), EOS]:
        finished = job.on_token(token)
        text = job.take().text  # what one hand-off would carry
        if text:
            emitted.append(text)
        if finished:
            break
    return emitted, job


@pytest.mark.parametrize(
    ("pieces", "stop", "text", "tokens"),
    [
        (["Hello", " wor", "ld", "!"], ["world"], "Hello ", 3),  # spans two tokens
        (["ab", "c<", "|e", "nd", "|>x"], ["<|end|>"], "abc", 5),  # spans four tokens
        (["abc", "def"], ["cd"], "ab", 2),
        (["xx", "STOPyy"], ["STOP"], "xx", 2),  # inside one token
        (["a", "b", "c"], ["zz", "bc", "b"], "a", 2),  # the earliest match wins
        (["ab", "ab", "c"], ["abc"], "ab", 3),  # a partial match that fails, then one
        (["a<", "|"], ["<|end"], "a<|", 2),  # EOS flushes the held tail
    ],
)
def test_stop_strings(pieces: list[str], stop: list[str], text: str, tokens: int) -> None:
    emitted, job = run(pieces, stop)
    assert "".join(emitted) == text
    assert job.stats.completion_tokens == tokens
    assert job.stats.finish_reason == "stop"


def test_held_text_is_released_once_it_cannot_start_a_stop() -> None:
    emitted, job = run(["one <", "tw", "o> three"], ["<end>"])
    # "<" is held while it might start "<end>", then released with "two".
    assert emitted == ["one ", "<tw", "o> three"]
    assert job.stats.finish_reason == "stop"  # by EOS, not counted
    assert job.stats.completion_tokens == 3


def test_length_flushes_the_held_tail() -> None:
    emitted, job = run(["abc", "<e"], ["<end>"], max_tokens=2)
    assert "".join(emitted) == "abc<e"
    assert job.stats.finish_reason == "length"
    assert job.stats.completion_tokens == 2


def test_partial_stop_len() -> None:
    assert _partial_stop_len("hello <|e", ["<|end|>"]) == 3
    assert _partial_stop_len("hello", ["<|end|>"]) == 0
    assert _partial_stop_len("ab", ["abc", "bx"]) == 2
    assert _partial_stop_len("", ["abc"]) == 0
