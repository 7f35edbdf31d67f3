"""Tabby's CNI side.

- `spec`: the CNI spec as pure, standard-library code (versions, errors, results, CNI_ARGS);
- `shim`: the `tabby` executable (standard library only) that forwards to tabby-node;
- `handler`, `fallback`: the entry for ADD/DEL/CHECK/GC/STATUS/VERSION, in tabby-node or
  in-process; `context` (Reply, Services, Ctx), `cmd_add`, `cmd_del` (+ pending deletes),
  `cmd_check` (CHECK, GC, STATUS) hold the commands;
- `netconf`, `wep`, `delegate`, `plumbing`, `netns`: the handler's parts;
- `ipam_plugin` (+ `ipam_conf`, `ipam_result`, `annotations`): the `tabby-ipam` plugin;
- `install`: `cni-install`, the node bootstrap.
"""
