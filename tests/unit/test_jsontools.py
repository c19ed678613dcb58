"""
Bounded JSON parsing for what comes from outside.
"""

from __future__ import annotations

import pytest

from gitlawb.jsontools import JsonTooDeep, nesting_depth, parse_json


def test_deep_nesting_refused_before_parsing() -> None:
    """A hundred thousand brackets are refused, not handed to the C parser."""
    with pytest.raises(JsonTooDeep):
        parse_json(b"[" * 100_000 + b"]" * 100_000)


def test_brackets_inside_strings_do_not_nest() -> None:
    """Brackets and escaped quotes inside strings are text, not nesting."""
    document = b'{"a": "[[[[{{{{\\"]]]]", "b": [1, {"c": []}]}'

    assert nesting_depth(document) == 4
    assert parse_json(document)["b"] == [1, {"c": []}]


def test_limit_is_inclusive() -> None:
    """A document exactly at the limit parses."""
    assert parse_json(b"[" * 64 + b"]" * 64, max_depth=64) == parse_json(
        b"[" * 64 + b"]" * 64, max_depth=100
    )
    with pytest.raises(JsonTooDeep):
        parse_json(b"[" * 65 + b"]" * 65, max_depth=64)
