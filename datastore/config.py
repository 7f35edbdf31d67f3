"""Where etcd is and how to reach it: calicoctl's config file, its environment, CNI netconf.

Sources, as calicoctl reads them:

- a config file in calicoctl's YAML format (`kind: CalicoAPIConfig`, `spec.etcdEndpoints`, ...);
- the environment: `ETCD_ENDPOINTS` (comma list), `ETCD_CA_CERT_FILE`, `ETCD_CERT_FILE`,
  `ETCD_KEY_FILE`, `DATASTORE_TYPE`;
- a CNI network config: `etcd_endpoints`, `etcd_ca_cert_file`, `etcd_cert_file`, `etcd_key_file`.

Every ConfigError is one line naming the source and what to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from datastore.errors import InputError

DEFAULT_CONFIG_PATH = "/etc/tabby/tabbyctl.cfg"
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_PORT = 2379

API_VERSION = "projectcalico.org/v3"
KIND = "CalicoAPIConfig"
DATASTORE_ETCD = "etcdv3"

# spec field -> EtcdConfig field, for the calicoctl config file
_FILE_FIELDS = {
    "etcdEndpoints": "endpoints",
    "etcdCACertFile": "ca_cert_file",
    "etcdCertFile": "cert_file",
    "etcdKeyFile": "key_file",
}
# Calico fields Tabby understands but does not support; the hint says what to do instead
_FILE_UNSUPPORTED = {
    "etcdCACert": "write the PEM to a file and set etcdCACertFile",
    "etcdCert": "write the PEM to a file and set etcdCertFile",
    "etcdKey": "write the PEM to a file and set etcdKeyFile",
    "etcdUsername": "Tabby authenticates to etcd with client certificates only",
    "etcdPassword": "Tabby authenticates to etcd with client certificates only",
    "etcdDiscoverySrv": "list the members in etcdEndpoints",
}
_ENV_FIELDS = {
    "ETCD_ENDPOINTS": "endpoints",
    "ETCD_CA_CERT_FILE": "ca_cert_file",
    "ETCD_CERT_FILE": "cert_file",
    "ETCD_KEY_FILE": "key_file",
}
_NETCONF_FIELDS = {
    "etcd_endpoints": "endpoints",
    "etcd_ca_cert_file": "ca_cert_file",
    "etcd_cert_file": "cert_file",
    "etcd_key_file": "key_file",
}


class ConfigError(InputError):
    """The etcd client configuration is unusable; str() is one actionable line."""


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    ca_cert_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = 5.0  # bound on every request
    dial_timeout: float = 3.0  # bound on reaching an endpoint


@dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint; `url` is the normalised form used in messages."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def target(self) -> str:
        """host:port as gRPC wants it (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.target}"


def parse_endpoint(text: str, source: str = "endpoint") -> Endpoint:
    """Parse `http(s)://host[:port]`; the port defaults to 2379."""
    hint = f"{source}: {text!r} is not an etcd endpoint; expected http(s)://host:port"
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(hint)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(hint)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:  # a port out of range or not a number
        raise ConfigError(hint) from None
    return Endpoint(parts.scheme, parts.hostname, port)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> EtcdConfig:
    """Load the client config the way calicoctl does.

    An explicit `path` must exist and is used alone. Otherwise `ETCD_ENDPOINTS` in the
    environment wins, then DEFAULT_CONFIG_PATH if it exists, then the defaults (with any
    certificate variables from the environment).
    """
    env = os.environ if env is None else env
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        return _from_file(path)
    _check_datastore_type(env.get("DATASTORE_TYPE", ""), "DATASTORE_TYPE")
    if env.get("ETCD_ENDPOINTS", "").strip():
        return _from_env(env)
    if os.path.isfile(DEFAULT_CONFIG_PATH):
        return _from_file(DEFAULT_CONFIG_PATH)
    return _from_env(env)


def config_from_netconf(netconf: Mapping[str, Any]) -> EtcdConfig:
    """The etcd settings of a CNI network config (Calico's field names)."""
    _check_datastore_type(_text(netconf.get("datastore_type"), "datastore_type"), "datastore_type")
    fields = {
        field: _text(netconf.get(key), f"netconf {key}") for key, field in _NETCONF_FIELDS.items()
    }
    return _build(fields, {field: f"netconf {key}" for key, field in _NETCONF_FIELDS.items()})


def _from_env(env: Mapping[str, str]) -> EtcdConfig:
    fields = {field: env.get(var, "") for var, field in _ENV_FIELDS.items()}
    return _build(fields, {field: var for var, field in _ENV_FIELDS.items()})


def _from_file(path: str) -> EtcdConfig:
    spec = _read_spec(path)
    _check_datastore_type(
        _text(spec.get("datastoreType"), f"{path}: spec.datastoreType"),
        f"{path}: spec.datastoreType",
    )
    for key, hint in _FILE_UNSUPPORTED.items():
        if key in spec:
            raise ConfigError(f"{path}: spec.{key} is not supported; {hint}")
    known = {"datastoreType", *_FILE_FIELDS}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown field spec.{unknown[0]}; known fields: {', '.join(sorted(known))}"
        )
    fields = {
        field: _text(spec.get(key), f"{path}: spec.{key}") for key, field in _FILE_FIELDS.items()
    }
    return _build(fields, {field: f"{path}: spec.{key}" for key, field in _FILE_FIELDS.items()})


def _read_spec(path: str) -> Mapping[str, Any]:
    """The `spec` of a calicoctl config file, after checking apiVersion and kind."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(str(e))}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a {KIND} document (apiVersion: {API_VERSION})")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ConfigError(
            f"{path}: expected apiVersion: {API_VERSION} and kind: {KIND}, "
            f"got apiVersion: {doc.get('apiVersion')} and kind: {doc.get('kind')}"
        )
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: spec must be a mapping")
    return spec


def _build(fields: Mapping[str, str], sources: Mapping[str, str]) -> EtcdConfig:
    """Validate raw string fields (empty = unset) into an EtcdConfig."""
    raw_endpoints = [e.strip() for e in fields["endpoints"].split(",") if e.strip()]
    endpoints = tuple(parse_endpoint(e, sources["endpoints"]).url for e in raw_endpoints) or (
        DEFAULT_ENDPOINT,
    )
    files = {
        name: fields[name].strip() or None for name in ("ca_cert_file", "cert_file", "key_file")
    }
    cert, key = files["cert_file"], files["key_file"]
    if (cert is None) != (key is None):
        have, missing = ("cert_file", "key_file") if cert else ("key_file", "cert_file")
        raise ConfigError(
            f"{sources[have]} is set but {sources[missing]} is not; "
            "a client certificate needs both its certificate and its key"
        )
    for name, value in files.items():
        if value is not None and not os.path.isfile(value):
            raise ConfigError(f"{sources[name]}: {value} does not exist")
    if any(files.values()) and not any(e.startswith("https://") for e in endpoints):
        named = next(sources[name] for name, value in files.items() if value)
        raise ConfigError(
            f"{named} is set but no endpoint uses https; use https:// endpoints for TLS"
        )
    return EtcdConfig(endpoints=endpoints, **files)


def _check_datastore_type(value: str, source: str) -> None:
    value = value.strip()
    if not value or value == DATASTORE_ETCD:
        return
    if value == "kubernetes":
        raise ConfigError(
            f"{source}=kubernetes is not supported: Tabby keeps its data in etcd only; "
            f"set it to {DATASTORE_ETCD} (or unset it) and point the etcd endpoints at your etcd"
        )
    raise ConfigError(f"{source}={value!r} is not a datastore type; use {DATASTORE_ETCD}")


def _text(value: Any, source: str) -> str:
    """A string setting; absent (None) reads as empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{source} must be a string, got {type(value).__name__}")
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())
