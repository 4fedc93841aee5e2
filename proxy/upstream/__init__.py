"""Calling DashScope: sending, failover, upstream health, relaying, fetching result images."""
