"""Durable copies of delivered images: backends, names, links and the storing pipeline."""
