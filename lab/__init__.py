"""Tabby lab package (built by a later issue)."""
