"""Opening the storage backend the config names.

`local` is built in; `s3` needs the `s3` extra (aiobotocore) and is imported only when
configured, so a gateway without it never loads it.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any, cast

from proxy.config.model import StorageConfig
from proxy.storage.backend import StorageBackend
from proxy.storage.local import LocalBackend


def make_backend(config: StorageConfig) -> tuple[StorageBackend, Path]:
    """The backend for `config` (not yet opened), and the directory where images are
    spooled while they are fetched (inside the store for `local`, so storing is a rename)."""
    if config.backend == "local":
        local = LocalBackend(config)
        return local, local.spool_dir
    # Imported by name: the module needs the optional `s3` extra.
    module: Any = importlib.import_module("proxy.storage.s3")
    return cast(StorageBackend, module.S3Backend(config)), Path(tempfile.gettempdir())
