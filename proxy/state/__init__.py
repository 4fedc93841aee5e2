"""Where task ownership, metering claims and limit counters live: SQLite or Redis."""
