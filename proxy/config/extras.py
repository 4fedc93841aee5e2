"""Whether an optional extra a config names is installed.

`state.backend: redis` needs the `redis` extra and `storage.backend: s3` the `s3`
extra. Naming a missing one is a config problem, reported by `check-config` and
refused by a reload like any other, instead of a failure at startup. Looks the
package up without importing it.
"""

from __future__ import annotations

import importlib.util

# backend -> (the package it imports, the extra that installs it)
EXTRAS = {"redis": ("redis", "redis"), "s3": ("aiobotocore", "s3")}


def missing_extra(backend: str) -> str | None:
    """A problem message when `backend` needs a package that is not installed (None for
    a built-in backend, or an unknown one: that is its own problem)."""
    if backend not in EXTRAS:
        return None
    package, extra = EXTRAS[backend]
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (
        f"{backend} needs {package}, which is not installed: pip install 'dashscope-proxy[{extra}]'"
    )
