"""datastore.config: calicoctl's environment and config file, CNI netconf, precedence, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from datastore import config as config_module
from datastore.config import (
    DEFAULT_ENDPOINT,
    ConfigError,
    EtcdConfig,
    config_from_netconf,
    load_config,
    parse_endpoint,
)


@pytest.fixture(autouse=True)
def no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point DEFAULT_CONFIG_PATH into tmp_path so the host's /etc never leaks into a test."""
    path = tmp_path / "default" / "tabbyctl.cfg"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(path))
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    """Certificate files that exist (their content is not read by config)."""
    files = {}
    for name in ("ca.pem", "cert.pem", "key.pem"):
        path = tmp_path / name
        path.write_text("PEM")
        files[name] = str(path)
    return files


def write_cfg(path: Path, spec: str, head: str | None = None) -> str:
    head = head or "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}metadata: {{}}\nspec:\n{spec}")
    return str(path)


def one_line(error: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# -- defaults and environment ------------------------------------------------------------------


def test_defaults_without_env_or_file() -> None:
    assert load_config(env={}) == EtcdConfig()
    assert EtcdConfig().endpoints == (DEFAULT_ENDPOINT,)


def test_env_endpoints_and_tls(pki: dict[str, str]) -> None:
    env = {
        "ETCD_ENDPOINTS": " https://10.0.0.1:2379, https://etcd.example ,",
        "ETCD_CA_CERT_FILE": pki["ca.pem"],
        "ETCD_CERT_FILE": pki["cert.pem"],
        "ETCD_KEY_FILE": pki["key.pem"],
        "DATASTORE_TYPE": "etcdv3",
    }
    assert load_config(env=env) == EtcdConfig(
        endpoints=("https://10.0.0.1:2379", "https://etcd.example:2379"),
        ca_cert_file=pki["ca.pem"],
        cert_file=pki["cert.pem"],
        key_file=pki["key.pem"],
    )


def test_https_without_ca_uses_system_roots() -> None:
    config = load_config(env={"ETCD_ENDPOINTS": "https://etcd.example:2379"})
    assert config.ca_cert_file is None and config.endpoints == ("https://etcd.example:2379",)


def test_ipv6_endpoint_keeps_brackets() -> None:
    config = load_config(env={"ETCD_ENDPOINTS": "http://[fd00::1]:4001,http://[fd00::2]"})
    assert config.endpoints == ("http://[fd00::1]:4001", "http://[fd00::2]:2379")


def test_datastore_type_kubernetes_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"DATASTORE_TYPE": "kubernetes"})
    message = one_line(err)
    assert "DATASTORE_TYPE" in message and "etcd only" in message


def test_unknown_datastore_type_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"DATASTORE_TYPE": "consul", "ETCD_ENDPOINTS": "http://a:1"})
    assert "etcdv3" in one_line(err)


@pytest.mark.parametrize(
    "endpoint",
    ["127.0.0.1:2379", "ftp://a:21", "http://", "http://a:99999", "http://a:x", "http://a/path"],
)
def test_bad_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"ETCD_ENDPOINTS": endpoint})
    message = one_line(err)
    assert "ETCD_ENDPOINTS" in message and repr(endpoint) in message and "http(s)://" in message


def test_cert_without_key_is_refused(pki: dict[str, str]) -> None:
    env = {"ETCD_ENDPOINTS": "https://a:2379", "ETCD_CERT_FILE": pki["cert.pem"]}
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    message = one_line(err)
    assert "ETCD_CERT_FILE is set but ETCD_KEY_FILE is not" in message


def test_key_without_cert_is_refused(pki: dict[str, str]) -> None:
    env = {"ETCD_ENDPOINTS": "https://a:2379", "ETCD_KEY_FILE": pki["key.pem"]}
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert "ETCD_KEY_FILE is set but ETCD_CERT_FILE is not" in one_line(err)


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    env = {"ETCD_ENDPOINTS": "https://a:2379", "ETCD_CA_CERT_FILE": missing}
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert one_line(err) == f"ETCD_CA_CERT_FILE: {missing} does not exist"


def test_certificates_with_only_http_endpoints_are_refused(pki: dict[str, str]) -> None:
    env = {"ETCD_ENDPOINTS": "http://a:2379", "ETCD_CA_CERT_FILE": pki["ca.pem"]}
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert "https" in one_line(err)


# -- config file -------------------------------------------------------------------------------


def test_calicoctl_config_file(tmp_path: Path, pki: dict[str, str]) -> None:
    path = write_cfg(
        tmp_path / "calicoctl.cfg",
        "  datastoreType: etcdv3\n"
        '  etcdEndpoints: "https://a:2379,https://b:2379"\n'
        f"  etcdKeyFile: {pki['key.pem']}\n"
        f"  etcdCertFile: {pki['cert.pem']}\n"
        f"  etcdCACertFile: {pki['ca.pem']}\n",
    )
    assert load_config(path, env={}) == EtcdConfig(
        endpoints=("https://a:2379", "https://b:2379"),
        ca_cert_file=pki["ca.pem"],
        cert_file=pki["cert.pem"],
        key_file=pki["key.pem"],
    )


def test_explicit_file_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.cfg")
    with pytest.raises(ConfigError) as err:
        load_config(missing, env={"ETCD_ENDPOINTS": "http://env:2379"})
    assert one_line(err) == f"config file {missing} does not exist"


def test_explicit_file_wins_over_env(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  etcdEndpoints: http://file:2379\n")
    env = {"ETCD_ENDPOINTS": "http://env:2379", "DATASTORE_TYPE": "kubernetes"}
    assert load_config(path, env=env).endpoints == ("http://file:2379",)


def test_env_wins_over_default_file(no_default_file: Path) -> None:
    write_cfg(no_default_file, "  etcdEndpoints: http://file:2379\n")
    assert load_config(env={"ETCD_ENDPOINTS": "http://env:2379"}).endpoints == ("http://env:2379",)


def test_default_file_is_used_without_env(no_default_file: Path) -> None:
    write_cfg(no_default_file, "  etcdEndpoints: http://file:2379\n")
    assert load_config(env={}).endpoints == ("http://file:2379",)


def test_env_certificates_apply_to_the_default_endpoint(pki: dict[str, str]) -> None:
    # without ETCD_ENDPOINTS the default (http) endpoint is used; certs then make no sense
    with pytest.raises(ConfigError):
        load_config(env={"ETCD_CA_CERT_FILE": pki["ca.pem"]})


def test_file_with_kubernetes_datastore_is_refused(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  datastoreType: kubernetes\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = one_line(err)
    assert path in message and "etcd only" in message


def test_file_with_wrong_kind_is_refused(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  etcdEndpoints: http://a:2379\n", "apiVersion: v1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "CalicoAPIConfig" in one_line(err)


def test_file_with_bad_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.cfg"
    path.write_text("apiVersion: [unclosed\n  kind: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), env={})
    assert "not valid YAML" in one_line(err)


def test_file_with_unknown_field_is_refused(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  etcdEndpoint: http://a:2379\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = one_line(err)
    assert "spec.etcdEndpoint" in message and "etcdEndpoints" in message


def test_file_with_inline_certificate_is_refused(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  etcdCACert: PEM\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "etcdCACertFile" in one_line(err)


def test_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  etcdEndpoints: etcd:2379\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert one_line(err).startswith(f"{path}: spec.etcdEndpoints: 'etcd:2379'")


def test_file_with_non_string_field_is_refused(tmp_path: Path) -> None:
    path = write_cfg(tmp_path / "c.cfg", "  etcdEndpoints: [http://a:2379]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "must be a string" in one_line(err)


# -- CNI netconf -------------------------------------------------------------------------------


def test_netconf_fields(pki: dict[str, str]) -> None:
    netconf = {
        "cniVersion": "1.0.0",
        "type": "tabby",
        "etcd_endpoints": "https://10.0.0.1:2379",
        "etcd_ca_cert_file": pki["ca.pem"],
        "etcd_cert_file": pki["cert.pem"],
        "etcd_key_file": pki["key.pem"],
    }
    assert config_from_netconf(netconf) == EtcdConfig(
        endpoints=("https://10.0.0.1:2379",),
        ca_cert_file=pki["ca.pem"],
        cert_file=pki["cert.pem"],
        key_file=pki["key.pem"],
    )


def test_netconf_without_etcd_fields_uses_defaults() -> None:
    assert config_from_netconf({"type": "tabby"}) == EtcdConfig()


def test_netconf_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_netconf({"etcd_endpoints": "nope"})
    assert "etcd_endpoints" in one_line(err)
    with pytest.raises(ConfigError) as err:
        config_from_netconf({"datastore_type": "kubernetes"})
    assert "etcd only" in one_line(err)


# -- endpoint parsing --------------------------------------------------------------------------


def test_parse_endpoint() -> None:
    ep = parse_endpoint("https://etcd.example")
    assert (ep.scheme, ep.host, ep.port, ep.tls) == ("https", "etcd.example", 2379, True)
    assert ep.target == "etcd.example:2379" and ep.url == "https://etcd.example:2379"
    assert parse_endpoint("http://[::1]:1/").target == "[::1]:1"
