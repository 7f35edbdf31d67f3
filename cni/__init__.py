"""Tabby's CNI side: the spec as pure data (`cni.spec`) and the `tabby-ipam` plugin.

The `tabby` shim, pod plumbing and the socket service arrive with issue 4.
"""
