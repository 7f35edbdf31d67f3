"""Tabby cni package (built by a later issue)."""
