"""
Parsing JSON that comes from outside (request bodies, peers' answers, gossip)
with a bound on nesting.

The C parser of the standard library recurses once per level of nesting, so
a small body of a hundred thousand brackets can exhaust the C stack when the
interpreter's recursion limit has been raised (some libraries raise it): the
process dies.  Such documents are refused before they reach the parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deeper documents are refused; no message of the protocol nests beyond a few.
MAX_DEPTH = 64

# Strings are skipped whole (their brackets do not nest); what remains that
# matters is brackets.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class JsonTooDeep(ValueError):
    """
    The document nests deeper than L{MAX_DEPTH}.
    """


def nesting_depth(raw: bytes) -> int:
    """
    The deepest nesting of arrays and objects in C{raw} (0 for a scalar).
    """
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_json(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """
    C{json.loads}, refusing documents nested deeper than C{max_depth}.

    @raise JsonTooDeep: for a document nested too deep.
    @raise ValueError: for anything that is not JSON (as C{json.loads}).
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if nesting_depth(data) > max_depth:
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    return json.loads(data)
