"""Cores are sans-IO: no core module imports trio, not even through what it imports.

A shell is a module that imports trio: a part's `service.py`, or a module
named for the protocol or device it drives (`gossip/peer.py`, `mesh/mdns.py`,
`mesh/socks.py`, `vmhost/qmp.py`, ...).  A core that turns bytes into events
is `<shell>_codec.py`; other cores are named for what they decide
(`gossip/node.py`, `gossip/pipeline.py`, `secrets/planner.py`,
`vmhost/lifecycle.py`, ...).  This test pins the cores: every module of
`gossip/` but its shells, all of `wire/`, every `*_codec.py`, and the named
decision cores below.
"""

import pkgutil
import subprocess
import sys

import clanagent

MODULES = sorted(m.name for m in pkgutil.walk_packages(clanagent.__path__, prefix="clanagent."))
GOSSIP_SHELLS = {"clanagent.gossip.peer", "clanagent.gossip.service"}
DECISION_CORES = [
    "clanagent.records",
    "clanagent.record_checks",
    "clanagent.publish_policy",
    "clanagent.inventory.model",
    "clanagent.inventory.merge",
    "clanagent.mesh.candidates",
    "clanagent.mesh.mdns_peers",
    "clanagent.mesh.nat",
    "clanagent.mesh.overlay",
    "clanagent.mesh.paths",
    "clanagent.mesh.peerplan",
    "clanagent.mesh.probe",
    "clanagent.mesh.relay",
    "clanagent.mesh.traversal",
    "clanagent.secrets.planner",
    "clanagent.services.wiring",
    "clanagent.vmhost.lifecycle",
]
CORES = sorted(
    {m for m in MODULES if m.startswith("clanagent.gossip.") and m not in GOSSIP_SHELLS}
    | {m for m in MODULES if m == "clanagent.wire" or m.startswith("clanagent.wire.")}
    | {m for m in MODULES if m.endswith("_codec")}
    | set(DECISION_CORES)
)

_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "trio" in sys.modules:
        print(name)
        break
"""


def test_the_cores_exist() -> None:
    missing = [m for m in CORES if m not in MODULES]
    assert missing == []
    assert "clanagent.gossip.pipeline" in CORES and "clanagent.mesh.socks_codec" in CORES


def test_no_core_imports_trio() -> None:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, *CORES], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    # The first core whose import brought trio in (empty: none did).
    assert r.stdout.strip() == ""


def test_the_probe_sees_a_core_that_imports_trio() -> None:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, "clanagent.wire", "clanagent.gossip.service"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout.strip() == "clanagent.gossip.service"
