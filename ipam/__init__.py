"""Tabby ipam package (built by a later issue)."""
