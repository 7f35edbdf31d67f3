"""Tabby datastore: etcd access in Calico's layout, resources, selectors, K8s conversion."""
