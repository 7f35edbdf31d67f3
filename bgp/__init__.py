"""Tabby bgp package (built by a later issue)."""
