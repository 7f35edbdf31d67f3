"""Which iptables backend (nft or legacy) to program, detected as Calico's `IptablesBackend: auto`.

Mixing backends leaves two rule sets the kernel both evaluates while each tool shows one, so
Tabby must write where kube-proxy writes. Detection order follows Felix
(`environment.DetectBackend`): kube-proxy's hint chains in nft mangle, then in legacy mangle,
then whichever backend holds more rules. Ties go to nft, the Debian default (Felix prefers
legacy there; on a fresh node nft is what the distro's `iptables` shows).
"""

from __future__ import annotations

from dataclasses import dataclass

from felix.dataplane.runner import Runner

NFT, LEGACY = "nft", "legacy"
KUBE_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


@dataclass(frozen=True)
class Backend:
    mode: str  # NFT | LEGACY

    def _tool(self, family: int, verb: str) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return f"{base}-{self.mode}-{verb}"

    def save_cmd(self, family: int, table: str) -> list[str]:
        return [self._tool(family, "save"), "-t", table]

    def restore_cmd(self, family: int) -> list[str]:
        # --wait: legacy serialises on the xtables lock; nft accepts and ignores it.
        return [self._tool(family, "restore"), "--noflush", "--wait", "10"]


def _save(runner: Runner, backend: Backend, family: int, *table: str) -> str:
    argv = backend.save_cmd(family, table[0]) if table else [backend._tool(family, "save")]
    res = runner.run(argv, check=False)
    return res.stdout if res.returncode == 0 else ""


def _legacy_loaded(runner: Runner, family: int) -> bool:
    # Probing legacy-save would autoload the legacy modules; this file exists only if loaded.
    path = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    return runner.run(["test", "-e", path], check=False).returncode == 0


def _count_rules(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-"))


def detect_backend(runner: Runner, configured: str = "auto") -> Backend:
    """The configured backend, or for "auto" the one kube-proxy (or anyone) already uses."""
    configured = configured.lower()
    if configured in (NFT, LEGACY):
        return Backend(configured)
    if configured != "auto":
        raise ValueError(f"iptables backend must be auto, nft or legacy, not {configured!r}")
    nft, legacy = Backend(NFT), Backend(LEGACY)
    families = (4, 6)
    if any(h in _save(runner, nft, f, "mangle") for f in families for h in KUBE_HINTS):
        return nft
    loaded = [f for f in families if _legacy_loaded(runner, f)]
    if any(h in _save(runner, legacy, f, "mangle") for f in loaded for h in KUBE_HINTS):
        return legacy
    legacy_rules = sum(_count_rules(_save(runner, legacy, f)) for f in loaded)
    if legacy_rules == 0:  # skip a full nft save (~1 s at 40k rules): nft wins ties anyway
        return nft
    nft_rules = sum(_count_rules(_save(runner, nft, f)) for f in families)
    return legacy if legacy_rules > nft_rules else nft
