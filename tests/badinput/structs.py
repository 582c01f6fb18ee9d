"""Hypothesis strategies for valid wire messages, derived from the Structs' own types.

:func:`valid_struct` reads :func:`msgspec.inspect.type_info` (field types and
``Meta`` constraints), so a field added to :mod:`provider.coordinator.messages` is
generated without touching this module. Checks that only ``__post_init__``
knows (byte lengths) are honoured by discarding the examples it refuses.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import assume
from hypothesis import strategies as st

from .strategies import edge_text, json_values

#: Unbounded strings and lists are kept short: size is tested elsewhere.
STR_CAP = 40
LIST_CAP = 3


def _for(info: mi.Type) -> st.SearchStrategy[Any]:
    if isinstance(info, mi.StrType):
        if info.pattern is not None:
            return st.from_regex(info.pattern, fullmatch=True)
        lo = info.min_length or 0
        hi = info.max_length if info.max_length is not None else max(lo, STR_CAP)
        return st.one_of(
            st.text(min_size=lo, max_size=hi),
            edge_text().filter(lambda s: lo <= len(s) <= hi),
        )
    if isinstance(info, mi.IntType):
        lo = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else None)
        hi = info.le if info.le is not None else (info.lt - 1 if info.lt is not None else None)
        return st.integers(min_value=lo, max_value=hi)
    if isinstance(info, mi.FloatType):
        lo = info.ge if info.ge is not None else info.gt
        hi = info.le if info.le is not None else info.lt
        return st.floats(
            min_value=lo,
            max_value=hi,
            exclude_min=info.gt is not None,
            exclude_max=info.lt is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.ListType):
        lo = info.min_length or 0
        hi = min(info.max_length if info.max_length is not None else LIST_CAP, max(lo, LIST_CAP))
        return st.lists(_for(info.item_type), min_size=lo, max_size=hi)
    if isinstance(info, mi.DictType):
        return st.dictionaries(_for(info.key_type), _for(info.value_type), max_size=3)
    if isinstance(info, mi.AnyType):
        return json_values(6)
    if isinstance(info, mi.UnionType):
        return st.one_of([_for(t) for t in info.types])
    if isinstance(info, mi.StructType):
        return _struct(info)
    raise NotImplementedError(f"no strategy for {info!r}")


def _struct(info: mi.StructType) -> st.SearchStrategy[Any]:
    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kwargs = {}
        for f in info.fields:
            if f.required or draw(st.booleans()):
                kwargs[f.name] = draw(_for(f.type))
        try:
            return info.cls(**kwargs)
        except (ValueError, TypeError):  # __post_init__ refused it
            assume(False)

    return build()


def valid_struct(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Valid instances of ``cls`` (every constraint of its fields respected)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return _struct(info)


@st.composite
def reserialized(draw: st.DrawFn, encoded: bytes, *, unknown_keys: bool = True) -> str:
    """The same JSON object, written differently: key order, unknown keys, escapes, spaces.

    ``unknown_keys`` False for bodies that refuse unknown fields (chat requests).
    """
    obj = json.loads(encoded)
    assert isinstance(obj, dict)
    items = list(obj.items())
    order = draw(st.permutations(range(len(items))))
    out = {items[i][0]: items[i][1] for i in order}
    for key in draw(st.lists(edge_text(8), max_size=3 if unknown_keys else 0)):
        if key not in obj:
            out[key] = draw(json_values(6))
    indent = draw(st.sampled_from([None, 0, 2, "\t"]))
    return json.dumps(out, ensure_ascii=draw(st.booleans()), indent=indent)
