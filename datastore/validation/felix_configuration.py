"""FelixConfiguration specs: Felix's settings and the defaults Calico writes (pure)."""

from __future__ import annotations

import re
from typing import Any

from datastore.errors import Problems
from datastore.validation._checks import (
    _INT,
    _INTERFACE,
    _STR_LIST,
    Check,
    _anything,
    _at,
    _boolean,
    _cidr,
    _Ctx,
    _enum,
    _fields,
    _has_problem,
    _integer,
    _ip,
    _list,
    _named,
    _pattern,
    _string,
    _string_map,
    _struct,
)
from datastore.validation.names import MAX_LABEL, _too_long, dns_label_problem
from datastore.validation.rules import _port, is_named_port

_FELIX_DURATION_RE = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m|h))*")

_BOOL, _STR, _ANY = _boolean, _string, _anything
_DUR = _pattern(_FELIX_DURATION_RE, "a duration such as 90s, 1m30s or 500ms")
_LOG_LEVEL = _enum("Trace", "Debug", "Info", "Warning", "Error", "Fatal", ci=True)


def openstack_region_problem(region: str) -> str | None:
    # Felix names a namespace "openstack-region-<region>", which must stay a DNS label.
    return dns_label_problem(region) or _too_long(region, MAX_LABEL - len("openstack-region-"))


def _failsafe_port(value: Any, path: str, p: Problems) -> Any:
    fields = {"protocol": _enum("TCP", "UDP", "SCTP"), "port": _integer(0, 65535),
              "net": _cidr(strict=False, bare_ip=True)}
    out = _fields(value, fields, path, p)
    if out is not None and "protocol" not in out:
        p.add(_at(path, "protocol"), "required: TCP, UDP or SCTP")
    return value if out is None else out


def _numeric_port(value: Any, path: str, p: Problems) -> Any:
    value = _port(value, path, p)
    if is_named_port(value) and not _has_problem(p, path):
        p.add(path, "must be a port number or 'min:max' range, not a name")
    return value


def _route_table_range(lo: int, hi: int) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        out = _fields(value, {"min": _INT, "max": _INT}, path, p)
        if out is None or _has_problem(p, path):
            return value
        low, high = out.get("min", 0), out.get("max", 0)
        if not lo <= low <= high <= hi:
            p.add(path, f"must be a range min <= max within {lo}..{hi}")
        return out
    return check


_FELIX_FIELDS: dict[str, Check] = {
    "nodeSelector": _STR, "useInternalDataplaneDriver": _BOOL, "dataplaneDriver": _STR,
    "dataplaneWatchdogTimeout": _DUR, "ipv6Support": _BOOL, "routeRefreshInterval": _DUR,
    "interfaceRefreshInterval": _DUR, "iptablesRefreshInterval": _DUR,
    "iptablesPostWriteCheckInterval": _DUR, "iptablesLockProbeInterval": _DUR,
    "featureDetectOverride": _STR, "featureGates": _STR, "ipsetsRefreshInterval": _DUR,
    "maxIpsetSize": _INT, "iptablesBackend": _enum("Auto", "Legacy", "NFT", ci=True),
    "xdpRefreshInterval": _DUR, "netlinkTimeout": _DUR, "metadataAddr": _STR,
    "metadataPort": _INT, "openstackRegion": _named(openstack_region_problem),
    "interfacePrefix": _STR,
    "interfaceExclude": _STR, "chainInsertMode": _enum("Insert", "Append", ci=True),
    "defaultEndpointToHostAction": _enum("Drop", "Accept", "Return", ci=True),
    "iptablesFilterAllowAction": _enum("Accept", "Return", ci=True),
    "iptablesMangleAllowAction": _enum("Accept", "Return", ci=True),
    "iptablesFilterDenyAction": _enum("Drop", "Reject", ci=True),
    "logPrefix": _pattern(re.compile(r"[a-zA-Z0-9%: /_-]*"),
                          "a log prefix (letters, digits and '%: /_-')"),
    "logActionRateLimit": _pattern(re.compile(r"[1-9][0-9]{0,3}/(second|minute|hour|day)"),
                                   "a rate such as 10/second"),
    "logActionRateLimitBurst": _INT, "logFilePath": _STR, "logSeverityFile": _LOG_LEVEL,
    "logSeverityScreen": _LOG_LEVEL, "logSeveritySys": _LOG_LEVEL, "logDebugFilenameRegex": _STR,
    "ipipEnabled": _BOOL, "ipipMTU": _INT, "vxlanEnabled": _BOOL, "vxlanMTU": _INT,
    "vxlanMTUV6": _INT, "vxlanPort": _INT, "vxlanVNI": _INT,
    "allowVXLANPacketsFromWorkloads": _BOOL, "allowIPIPPacketsFromWorkloads": _BOOL,
    "reportingInterval": _DUR, "reportingTTL": _DUR, "endpointReportingEnabled": _BOOL,
    "endpointReportingDelay": _DUR, "endpointStatusPathPrefix": _STR, "iptablesMarkMask": _INT,
    "disableConntrackInvalidCheck": _BOOL, "healthEnabled": _BOOL, "healthHost": _STR,
    "healthPort": _INT,
    "healthTimeoutOverrides": _list(_struct({
        "name": _pattern(re.compile(r"[a-zA-Z0-9_ -]+"), "a health reporter name"),
        "timeout": _DUR})),
    "prometheusMetricsEnabled": _BOOL, "prometheusMetricsHost": _STR,
    "prometheusMetricsPort": _INT, "prometheusGoMetricsEnabled": _BOOL,
    "prometheusProcessMetricsEnabled": _BOOL, "prometheusWireGuardMetricsEnabled": _BOOL,
    "prometheusMetricsCAFile": _STR, "prometheusMetricsCertFile": _STR,
    "prometheusMetricsKeyFile": _STR,
    "prometheusMetricsClientAuth": _enum("RequireAndVerifyClientCert", "RequireAnyClientCert",
                                         "VerifyClientCertIfGiven", "NoClientCert"),
    "failsafeInboundHostPorts": _list(_failsafe_port),
    "failsafeOutboundHostPorts": _list(_failsafe_port),
    "kubeNodePortRanges": _list(_numeric_port, max_items=7),
    "policySyncPathPrefix": _STR, "usageReportingEnabled": _BOOL,
    "usageReportingInitialDelay": _DUR, "usageReportingInterval": _DUR,
    "natPortRange": _numeric_port, "natOutgoingAddress": _ip(),
    "natOutgoingExclusions": _enum("IPPoolsOnly", "IPPoolsAndHostIPs"),
    "deviceRouteSourceAddress": _ip(), "deviceRouteSourceAddressIPv6": _ip(),
    "deviceRouteProtocol": _INT, "removeExternalRoutes": _BOOL,
    "programClusterRoutes": _enum("Enabled", "Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly"),
    "ipForwarding": _enum("Enabled", "Disabled"),
    "externalNodesList": _list(_cidr(strict=False, bare_ip=True, version=4)),
    "debugMemoryProfilePath": _STR, "debugDisableLogDropping": _BOOL,
    "debugSimulateCalcGraphHangAfter": _DUR, "debugSimulateDataplaneHangAfter": _DUR,
    "debugSimulateDataplaneApplyDelay": _DUR, "debugHost": _STR,
    "debugPort": _integer(0, 65535), "iptablesNATOutgoingInterfaceFilter": _STR,
    "sidecarAccelerationEnabled": _BOOL, "xdpEnabled": _BOOL, "genericXDPEnabled": _BOOL,
    "nftablesMode": _enum("Disabled", "Enabled", "Auto"),
    "nftablesFlowTableOffload": _enum("All", "Disabled"),
    "nftablesFlowTableDataIfacePattern": _STR, "nftablesRefreshInterval": _DUR,
    "nftablesFilterAllowAction": _enum("Accept", "Return", ci=True),
    "nftablesMangleAllowAction": _enum("Accept", "Return", ci=True),
    "nftablesFilterDenyAction": _enum("Drop", "Reject", ci=True),
    "nftablesMarkMask": _INT, "bpfEnabled": _BOOL,
    "bpfOverlayHostSourceIP": _enum("TunnelAddress", "HostAddress"),
    "bpfDisableUnprivileged": _BOOL, "bpfJITHardening": _enum("Auto", "Strict"),
    "bpfLogLevel": _enum("Off", "Info", "Debug", ci=True),
    "bpfConntrackLogLevel": _enum("Off", "Debug"),
    "bpfConntrackMode": _enum("Auto", "Userspace", "BPFProgram"),
    "bpfConntrackTimeouts": _ANY, "bpfIPFragTimeout": _DUR, "bpfLogFilters": _string_map,
    "bpfCTLBLogFilter": _STR, "bpfDataIfacePattern": _STR, "bpfL3IfacePattern": _STR,
    "bpfConnectTimeLoadBalancingEnabled": _BOOL,
    "bpfConnectTimeLoadBalancing": _enum("TCP", "Enabled", "Disabled"),
    "bpfHostNetworkedNATWithoutCTLB": _enum("Enabled", "Disabled"),
    "bpfExternalServiceMode": _enum("Tunnel", "DSR", ci=True),
    "bpfDSROptoutCIDRs": _list(_cidr(strict=False, bare_ip=True)),
    "bpfExtToServiceConnmark": _integer(0, 4294967295),
    "bpfKubeProxyIptablesCleanupEnabled": _BOOL, "bpfKubeProxyMinSyncPeriod": _DUR,
    "bpfKubeProxyHealthzPort": _integer(0, 65535), "bpfPSNATPorts": _numeric_port,
    "bpfMapSizeNATFrontend": _INT, "bpfMapSizeNATBackend": _INT, "bpfMapSizeNATAffinity": _INT,
    "bpfMapSizeRoute": _INT, "bpfMapSizeConntrack": _INT, "bpfMapSizePerCpuConntrack": _INT,
    "bpfMapSizeConntrackScaling": _enum("Disabled", "DoubleIfFull", ci=True),
    "bpfMapSizeConntrackCleanupQueue": _integer(1), "bpfMapSizeIPSets": _INT,
    "bpfMapSizeIfState": _INT, "bpfHostConntrackBypass": _BOOL,
    "bpfIPFragmentReassemblyEnabled": _BOOL,
    "bpfEnforceRPF": _enum("Disabled", "Strict", "Loose", ci=True),
    "bpfPolicyDebugEnabled": _BOOL, "bpfForceTrackPacketsFromIfaces": _STR_LIST,
    "bpfDisableGROForIfaces": _STR,
    "bpfExcludeCIDRsFromNAT": _list(_cidr(strict=False, bare_ip=True)),
    "bpfExportBufferSizeMB": _INT, "istioAmbientMode": _enum("Enabled", "Disabled"),
    "istioDSCPMark": _ANY, "cgroupV2Path": _STR,
    "flowLogsPolicyEvaluationMode": _enum("None", "Continuous"),
    "bpfRedirectToPeer": _enum("Enabled", "Disabled"),
    "bpfAttachType": _enum("TC", "TCX", "Netkit"), "flowLogsFlushInterval": _DUR,
    "flowLogsCollectorDebugTrace": _BOOL, "flowLogsGoldmaneServer": _STR,
    "flowLogsLocalReporter": _enum("Disabled", "Enabled"),
    "bpfProfiling": _enum("Enabled", "Disabled"),
    "routeSource": _enum("WorkloadIPs", "CalicoIPAM", ci=True),
    "routeTableRanges": _list(_route_table_range(1, 0xFFFFFFFF)),
    "routeTableRange": _route_table_range(1, 250), "routeSyncDisabled": _BOOL,
    "ipv4NormalRoutePriority": _integer(1, 2147483646),
    "ipv4ElevatedRoutePriority": _integer(1, 2147483646),
    "ipv6NormalRoutePriority": _integer(1, 2147483646),
    "ipv6ElevatedRoutePriority": _integer(1, 2147483646),
    "liveMigrationRouteConvergenceTime": _DUR, "wireguardEnabled": _BOOL,
    "wireguardEnabledV6": _BOOL, "wireguardThreadingEnabled": _BOOL,
    "wireguardListeningPort": _integer(1, 65535), "wireguardListeningPortV6": _integer(1, 65535),
    "wireguardRoutingRulePriority": _integer(1, 32765), "wireguardInterfaceName": _INTERFACE,
    "wireguardInterfaceNameV6": _INTERFACE, "wireguardMTU": _INT, "wireguardMTUV6": _INT,
    "wireguardHostEncryptionEnabled": _BOOL, "wireguardKeepAlive": _DUR,
    "awsSrcDstCheck": _enum("DoNothing", "Enable", "Disable"),
    "serviceLoopPrevention": _enum("Drop", "Reject", "Disabled"),
    "workloadSourceSpoofing": _enum("Disabled", "Any"), "mtuIfacePattern": _STR,
    "floatingIPs": _enum("Enabled", "Disabled"),
    "localSubnetL2Reachability": _enum("Disabled", "PodsAndLoadBalancers"),
    "localSubnetL2ReachabilityRefreshInterval": _DUR,
    "windowsManageFirewallRules": _enum("Enabled", "Disabled"),
    "goGCThreshold": _integer(-1), "goMemoryLimitMB": _integer(-1), "goMaxProcs": _integer(-1),
    "requireMTUFile": _BOOL, "bpfMaglevMaxEndpointsPerService": _integer(1, 3000),
    "bpfMaglevMaxServices": _integer(1, 3000),
}


def _felix_configuration(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _FELIX_FIELDS, "spec", p)
    if out is None:
        return None
    ranges = out.get("routeTableRanges")
    if isinstance(ranges, list) and not _has_problem(p, "spec.routeTableRanges"):
        tables = sum(r["max"] - r["min"] + 1 for r in ranges)
        if tables > 0xFFFF:
            p.add("spec.routeTableRanges", f"targets {tables} tables; the limit is 65535")
    _felix_defaults(out)
    return out


def _felix_defaults(spec: dict[str, Any]) -> None:
    """The defaults Calico's client and CRD schema write into every FelixConfiguration."""
    spec.setdefault("floatingIPs", "Disabled")
    spec.setdefault("nftablesMode", "Auto")
    spec.setdefault("nftablesFlowTableOffload", "Disabled")
    ctlb = spec.get("bpfConnectTimeLoadBalancingEnabled")
    if ctlb is None:
        spec.setdefault("bpfConnectTimeLoadBalancing", "TCP")
        spec.setdefault("bpfHostNetworkedNATWithoutCTLB", "Enabled")
    else:
        # The deprecated boolean wins over the newer fields, as in Calico's client.
        spec["bpfConnectTimeLoadBalancing"] = "Enabled" if ctlb is True else "Disabled"
        spec["bpfHostNetworkedNATWithoutCTLB"] = "Disabled"
