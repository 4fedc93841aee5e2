"""Image counting: what DashScope says it generated, found in bodies we relay, and recorded.

- `proxy.metering.facts`: pure readers of DashScope's answers (`BodyFacts`: the image
  count, task id and status, the delivered size), bounded scanners for large bodies and
  SSE streams.
- `proxy.metering.meter`: `Meter`, the one place a count is recorded (the metrics, then
  the listeners: usage ledger, quotas, spend), and the events it hands them.

Everything is re-exported here: callers import from `proxy.metering`.
"""

from proxy.metering.facts import (
    INVALID_COUNT_FIELD,
    NO_COUNT_FIELD,
    PARSE_LIMIT,
    BodyFacts,
    BodySniffer,
    SseSniffer,
    count_of,
    facts_from_bytes,
    facts_from_json,
    images_held,
    parse_facts,
    size_of,
)
from proxy.metering.meter import (
    Meter,
    UnmeteredEvent,
    UnmeteredListener,
    UsageEvent,
    UsageListener,
)

__all__ = [
    "INVALID_COUNT_FIELD",
    "NO_COUNT_FIELD",
    "PARSE_LIMIT",
    "BodyFacts",
    "BodySniffer",
    "Meter",
    "SseSniffer",
    "UnmeteredEvent",
    "UnmeteredListener",
    "UsageEvent",
    "UsageListener",
    "count_of",
    "facts_from_bytes",
    "facts_from_json",
    "images_held",
    "parse_facts",
    "size_of",
]
