"""The lab's libcni-like driver and argument parsing (pure parts)."""

from __future__ import annotations

import pytest

from lab import LabError, pods
from lab.driver import CNIError, plugin_conf
from lab.state import Lab

NET = {"name": "k8s-pod-network", "cniVersion": "1.0.0"}


def test_plugin_conf_injects_name_version_prev_and_capabilities() -> None:
    portmap = {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}}
    conf = plugin_conf(portmap, NET, {"ips": []},
                       {"portMappings": [{"hostPort": 8080}], "bandwidth": {"x": 1}, "ips": []})
    assert conf["name"] == "k8s-pod-network" and conf["cniVersion"] == "1.0.0"
    assert conf["prevResult"] == {"ips": []}
    assert conf["runtimeConfig"] == {"portMappings": [{"hostPort": 8080}]}


def test_plugin_conf_without_capabilities_gets_no_runtime_config() -> None:
    conf = plugin_conf({"type": "tabby"}, NET, None, {"portMappings": []})
    assert "runtimeConfig" not in conf and "prevResult" not in conf


def test_cni_error_shows_code_and_message() -> None:
    e = CNIError("tabby", "ADD", 1, '{"code": 11, "msg": "Try again later", "details": "x"}', "")
    assert "code 11: Try again later (x)" in str(e)


def test_parsers() -> None:
    assert pods.parse_ref("shop/web") == pods.PodRef("shop", "web")
    assert pods.parse_ref("web") == pods.PodRef("default", "web")
    assert pods.parse_labels("app=web, tier=front") == {"app": "web", "tier": "front"}
    assert pods.parse_port("http:80/tcp") == {"name": "http", "containerPort": 80,
                                              "protocol": "TCP"}
    assert pods.parse_port("53/UDP") == {"containerPort": 53, "protocol": "UDP"}
    for bad in ("http:", "x:80/", "a b:1"):
        with pytest.raises(LabError):
            pods.parse_port(bad)
    with pytest.raises(LabError):
        pods.parse_labels("novalue")


def test_lab_names_cannot_overlap_prefixes() -> None:
    assert Lab("t1").prefix == "tabby-lab-t1-"
    for bad in ("a-b", "", "UP", "x" * 21, "../x"):
        with pytest.raises(LabError):
            Lab(bad)
