"""tabby-node: the per-node daemon (`node.main`), its CNI socket service (`node.cni_service`),
health endpoint (`node.health`) and Node registration (`node.registration`)."""
