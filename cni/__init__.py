"""Tabby's CNI side.

- `spec`: the CNI spec as pure, standard-library code (versions, errors, results, CNI_ARGS);
- `shim`: the `tabby` executable (standard library only) that forwards to tabby-node;
- `handler`, `fallback`: ADD/DEL/CHECK/GC/STATUS/VERSION, in tabby-node or in-process;
- `netconf`, `wep`, `delegate`, `plumbing`, `netns`: the handler's parts;
- `ipam_plugin` (+ `ipam_conf`, `ipam_result`, `annotations`): the `tabby-ipam` plugin;
- `install`: `cni-install`, the node bootstrap.
"""
