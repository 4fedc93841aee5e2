"""Opening the state backend the config names."""

from __future__ import annotations

from proxy.config.model import StateConfig
from proxy.metrics import Metrics
from proxy.state.local import LocalState, StateBackend


async def open_state(config: StateConfig, metrics: Metrics) -> StateBackend:
    """The backend the config names, opened (Redis: possibly degraded, never failing)."""
    if config.backend == "redis":
        from proxy.state.redis import RedisState  # the `redis` extra, only when configured

        return await RedisState.open(config, metrics)
    return await LocalState.open(config)
