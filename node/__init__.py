"""Tabby node package (built by a later issue)."""
