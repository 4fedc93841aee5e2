"""Reading one YAML section: typed getters that record every problem with its location.

`Section` reads a mapping at a location (`keys[2]`); each getter returns the value
or a default and adds a located problem to the shared `Problems` when the value has
the wrong type or range, so one pass finds every problem. `interpolate` resolves
`${VAR}` in every string. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Fields whose value a problem message must never echo (problems are logged on reload).
_SECRET_FIELDS = frozenset(
    {"key", "api_key", "password", "sentinel_password", "signing_key", "secret_access_key"}
    | {"access_key_id"}
)


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}" if where else message)


def interpolate(value: Any, where: str, environ: Mapping[str, str], p: Problems) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in environ:
                p.add(where, f"environment variable {name} is not set")
                return m.group(0)  # keep the text so later checks do not pile on
            return environ[name]

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: interpolate(v, f"{where}.{k}" if where else str(k), environ, p)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, f"{where}[{i}]", environ, p) for i, v in enumerate(value)]
    return value


class Section:
    """Typed reads from one mapping, recording problems instead of raising."""

    def __init__(self, data: Any, where: str, p: Problems, allowed: set[str]) -> None:
        self.where = where
        self.p = p
        if data is None:
            data = {}
        if not isinstance(data, dict):
            p.add(where, "must be a mapping")
            data = {}
        self.data: dict[str, Any] = data
        for k in data:
            if k not in allowed:
                hint = sorted(allowed)
                p.add(self.loc(str(k)), f"unknown field (expected one of: {', '.join(hint)})")

    def loc(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any, check: Callable[[Any], bool], kind: str) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        v = self.data[key]
        if not check(v):
            shown = f"a {type(v).__name__} (value not shown)" if key in _SECRET_FIELDS else repr(v)
            self.p.add(self.loc(key), f"must be {kind}, got {shown}"[:200])
            return default
        return v

    def text(self, key: str, default: Any = None, required: bool = False) -> Any:
        if required and self.data.get(key) in (None, ""):
            self.p.add(self.loc(key), "is required")
            return default
        return self._get(key, default, lambda v: isinstance(v, str), "a string")

    def text_or_off(self, key: str, default: str) -> str | None:
        """A string that `null` turns off: absent = `default`, `null` = None. (Elsewhere
        null means "the default"; here the default is on, so null must be able to say off.)"""
        if key not in self.data:
            return default
        if self.data[key] is None:
            return None
        value = self.text(key, default)
        if value == "":
            self.p.add(self.loc(key), "must be a path, or null to turn it off")
            return default
        return str(value)

    def flag(self, key: str, default: bool) -> bool:
        return bool(self._get(key, default, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, key: str, default: Any, minimum: int = 0, maximum: int | None = None) -> Any:
        def ok(v: Any) -> bool:
            return (
                isinstance(v, int)
                and not isinstance(v, bool)
                and v >= minimum
                and (maximum is None or v <= maximum)
            )

        rng = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        return self._get(key, default, ok, rng)

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        def ok(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and v >= minimum

        return float(self._get(key, default, ok, f"a number >= {minimum:g}"))

    def optional_number(self, key: str, minimum: float = 0.0) -> float | None:
        """A number >= `minimum`, or None when absent or null (an unset limit)."""
        if self.data.get(key) is None:
            return None
        before = len(self.p.items)
        value = self.number(key, minimum, minimum)
        return None if len(self.p.items) > before else value

    def globs(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            self.p.add(self.loc(key), "must be a non-empty list of glob patterns")
            return default
        return tuple(v)

    def section(self, key: str, allowed: set[str]) -> Section:
        return Section(self.data.get(key), self.loc(key), self.p, allowed)

    def items(self, key: str) -> list[Any]:
        v = self.data.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.p.add(self.loc(key), "must be a list")
            return []
        return v
