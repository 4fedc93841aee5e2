"""Memoising what is derived from a config value, per config object.

A loaded config is immutable and lives until a reload replaces it, so an
answer derived from one of its values (does this key have limits? which price
entry fits this model?) can be kept with the value itself. `functools.lru_cache`
would hash the value on every call, and hashing a frozen dataclass hashes
every field in Python, recursively: more than the answers cost, on every
request, growing with the size of the price table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
T = TypeVar("T")

# Distinct config objects remembered per function: every reload makes new ones.
MAX_OBJECTS = 1024


def per_config(fn: Callable[[K], T]) -> Callable[[K], T]:
    """`fn` of one config value, memoised per object (by identity). The object is kept
    with its answer, so a later object that reuses the id is never mistaken for it."""
    memo: dict[int, tuple[K, T]] = {}

    def memoised(value: K) -> T:
        hit = memo.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        if len(memo) >= MAX_OBJECTS:  # reloaded many times: forget the old configs
            memo.clear()
        answer = fn(value)
        memo[id(value)] = (value, answer)
        return answer

    return functools.update_wrapper(memoised, fn)
