"""Parsing `pricing:`: a currency label and per-model prices, every problem with its location.

    pricing:
      currency: USD
      models:
        "qwen-image-3.0-pro": {per_image: 0.075, tiers: [{max_pixels: 1572864, per_image: 0.04}]}
        "qwen-image-plus*": {per_image: 0.03}

Patterns are globs, tried in file order (YAML mappings keep it); every amount is a
finite number >= 0; tiers must grow in `max_pixels`, because the first tier that fits the
delivered image wins and a smaller tier after a larger one could never be chosen. There
are no built-in prices: what DashScope charges differs by region and changes, so only the
operator can say (`config/pricing.example.yaml` is a starting point). Pure, like
`proxy.config.parse`; applying prices is `proxy.core.pricing`.
"""

from __future__ import annotations

import math

from proxy.config.model import ModelPrice, PriceTier, PricingConfig
from proxy.config.sections import Section


def parse_pricing(s: Section) -> PricingConfig:
    """`pricing:`: a currency label and per-model prices, each problem with its location."""
    d = PricingConfig()
    currency = s.text("currency", d.currency)
    if not currency or len(currency) > 16 or currency.strip() != currency:
        s.p.add(s.loc("currency"), "must be a short label such as USD or CNY (1-16 characters)")
    raw = s.data.get("models")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        s.p.add(s.loc("models"), "must be a mapping of model glob patterns to prices")
        raw = {}
    prices: list[ModelPrice] = []
    for pattern, body in raw.items():
        where = s.loc("models") + f".{pattern}"
        if not isinstance(pattern, str) or not pattern:
            s.p.add(where, "a model pattern must be a non-empty string")
            continue
        if not isinstance(body, dict):
            s.p.add(where, "must be a mapping such as {per_image: 0.03}")
            continue
        m = Section(body, where, s.p, {"per_image", "tiers"})
        per_image = _price(m, "per_image")
        tiers: list[PriceTier] = []
        for i, item in enumerate(m.items("tiers")):
            t = Section(item, f"{m.loc('tiers')}[{i}]", s.p, {"max_pixels", "per_image"})
            if t.data.get("max_pixels") is None:
                s.p.add(t.loc("max_pixels"), "is required (width x height of the largest image)")
                continue
            tier = PriceTier(t.integer("max_pixels", 0, 1), _price(t, "per_image"))
            if tiers and 0 < tier.max_pixels <= tiers[-1].max_pixels:
                # The first tier that fits wins: a smaller one after a larger is unreachable.
                s.p.add(
                    t.loc("max_pixels"),
                    f"must be larger than the tier before it ({tiers[-1].max_pixels}); "
                    "list tiers from the smallest images up",
                )
            tiers.append(tier)
        prices.append(ModelPrice(pattern, per_image, tuple(tiers)))
    return PricingConfig(currency=currency or d.currency, models=tuple(prices))


def _price(s: Section, key: str) -> float:
    """A required, finite amount >= 0."""
    if s.data.get(key) is None:
        s.p.add(s.loc(key), "is required (the price of one image)")
        return 0.0
    value = s.number(key, 0.0)
    if not math.isfinite(value):
        s.p.add(s.loc(key), "must be a finite number")
        return 0.0
    return value
