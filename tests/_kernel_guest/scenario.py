"""The kernel-WireGuard mesh scenario, run inside the QEMU guest (never on the host).

Usage (guest.sh): python -m tests._kernel_guest.scenario

Three real agents (`tests._kernel_guest.agent`) in network namespaces on one
switch (tests/_netns.py `Lan`) found a clan, join it by a seed address, and
build the WireGuard mesh with whatever backend they choose -- the kernel is
expected.  Each property is checked with the stock tools (`ip`, `ping`,
`wg show ... dump`) against what the agents say (`clanctl`, called
in-process: a Python start-up over 9p under TCG costs seconds) and against
the desired state rebuilt from the machines' own keys with the product's
`desired_from`.  The outcome is one line, ``KGUEST_RESULT {json}``, on
stdout (the serial console): {"checks": {name: [ok, detail]}, "timings":
{step: seconds}, "notes": {...}, "error": str|null}.

Must never: run outside a throwaway guest (it leaves kernel interfaces and
namespaces behind on purpose; the guest powers off after it).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from clanagent.cli import clanctl as clanctl_cli
from clanagent.identity import load as load_identity
from clanagent.identity import load_or_create, machine_key_string
from clanagent.inventory import Anchor, load_anchor, parse_token, save_anchor
from clanagent.mesh.overlay import vm_ip6
from clanagent.mesh.wireguard import MeshPeer, desired_from

from .._netns import Lan, agent_config, sh

N = 3
WG_PORT = 51820
ROOT = Path("/tmp/kg")
checks: dict[str, list[Any]] = {}
timings: dict[str, float] = {}
notes: dict[str, Any] = {}
T0 = time.monotonic()


def mark(step: str) -> None:
    timings[step] = round(time.monotonic() - T0, 1)
    print(f"KGUEST step {step} at {timings[step]} s", flush=True)


def check(name: str, ok: bool, detail: Any) -> None:
    checks[name] = [bool(ok), detail]
    print(f"KGUEST check {name}: {'ok' if ok else 'FAILED'} {detail}", flush=True)


def ctl(sock: Path, *args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = clanctl_cli.main(["--socket", str(sock), "--timeout", "120", *args])
    if rc != 0:
        raise RuntimeError(f"clanctl {' '.join(args)}: rc {rc}: {err.getvalue().strip()}")
    return out.getvalue()


def ctl_json(sock: Path, *args: str) -> Any:
    return json.loads(ctl(sock, "--json", *args))


def poll(pred, timeout: float, what: str, every: float = 0.3) -> float:
    """Seconds until PRED() is true; PRED may raise while things come up."""
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except Exception as exc:  # an agent still starting, a path not chosen yet
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def wg_dump(ns: str, ifname: str) -> dict[str, Any]:
    """`wg show IFNAME dump` -> {private, port, peers: {pub: {...}}} (keys base64)."""
    out = sh("ip", "netns", "exec", ns, "wg", "show", ifname, "dump").stdout.splitlines()
    private, _public, port, _fwmark = out[0].split("\t")
    peers = {}
    for line in out[1:]:
        pub, _psk, endpoint, allowed, hs, rx, tx, ka = line.split("\t")
        peers[pub] = {
            "endpoint": endpoint,
            "allowed": sorted(allowed.split(",")) if allowed != "(none)" else [],
            "handshake": int(hs),
            "rx": int(rx),
            "tx": int(tx),
            "keepalive": ka,
        }
    return {"private": private, "port": int(port), "peers": peers}


def link(ns: str, ifname: str) -> dict[str, Any]:
    (row,) = json.loads(sh("ip", "-n", ns, "-d", "-j", "link", "show", ifname).stdout)
    return row


class Clan:
    def __init__(self) -> None:
        self.lan = Lan(N, prefix="kg")
        self.homes = [ROOT / f"m{i + 1}" for i in range(N)]
        self.socks = [h / "control.sock" for h in self.homes]
        self.ifaces = [f"kgw{i + 1}" for i in range(N)]
        self.names = [f"m{i + 1}" for i in range(N)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.admin = ROOT / "admin.key"

    def start_agent(self, i: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "tests._kernel_guest.agent",
            str(self.homes[i] / "agent.toml"),
        ]
        log = self.homes[i] / f"agent{len(self.lan.procs)}.log"
        self.procs[i] = self.lan.spawn(i, argv, log)

    def stop_agent(self, i: int) -> None:
        p = self.procs.pop(i)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)

    def wait_socket(self, i: int, timeout: float = 90) -> None:
        poll(lambda: ctl_json(self.socks[i], "status") is not None, timeout, f"m{i + 1} up")

    def ident(self, i: int):
        return load_identity(self.homes[i] / "state")

    def found(self) -> None:
        ROOT.mkdir(parents=True, exist_ok=True)
        for i, home in enumerate(self.homes):
            home.mkdir()
            # "lan" timings: "local" ones (0.2 s probe timeout) mark machines dead
            # when TCG is starved of CPU, and a dead machine's VM routes lapse.
            agent_config(home, self.names[i], self.ifaces[i], profile="lan")
        self.start_agent(0)
        self.wait_socket(0)
        mark("m1 up")
        ctl(self.socks[0], "clan", "init", "kg", "--admin-key", str(self.admin),
            "--machine", "m1", "--tags", "lan")  # fmt: skip
        for i in range(1, N):
            ident, _ = load_or_create(self.homes[i] / "state")
            out = ctl(self.socks[0], "machine", "add", self.names[i], "--key",
                      machine_key_string(ident), "--tags", "lan", "--admin-key",
                      str(self.admin), "--yes")  # fmt: skip
            token = parse_token(
                next(ln.split()[-1] for ln in out.splitlines() if "clanagent join" in ln)
            )
            seed = f"{self.lan.ip(0)}:7946"
            save_anchor(
                self.homes[i] / "state",
                Anchor(token.clan_id, token.name, token.admins, (seed,), token.machine),
            )
            self.start_agent(i)
        for i in range(1, N):
            self.wait_socket(i)
        mark("all agents up")

    def apply_inventory(self, text: str) -> None:
        path = ROOT / "inventory.toml"
        path.write_text(text)
        ctl(self.socks[0], "inventory", "apply", str(path), "--admin-key", str(self.admin), "--yes")


def without_section(toml: str, header: str) -> str:
    """TOML text minus the table HEADER (and its sub-tables)."""
    out, skip = [], False
    for line in toml.splitlines():
        s = line.strip()
        if s.startswith("["):
            name = s.strip("[]").strip()
            skip = name == header or name.startswith(header + ".")
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


def run(c: Clan) -> None:
    loaded_before = Path("/sys/module/wireguard").exists()
    c.found()
    lan = c.lan

    def all_online() -> bool:
        for s in c.socks:
            rows = ctl_json(s, "machines")
            if len(rows) != N or not all(r["online"] for r in rows):
                return False
        return True

    poll(all_online, 120, "every machine online everywhere")
    mark("all online")

    # -- backend choice ------------------------------------------------------------
    reasons = []
    for s in c.socks:
        caps = {x["name"]: x for x in ctl_json(s, "status")["capabilities"]}
        reasons.append(caps["mesh.wireguard"]["reason"])
    status_text = ctl(c.socks[0], "status")
    check(
        "backend_kernel",
        all(r.startswith("kernel (netlink)") for r in reasons)
        and "kernel (netlink)" in status_text,
        reasons,
    )
    check(
        "module_autoloaded",
        not loaded_before and Path("/sys/module/wireguard").exists(),
        {"loaded before the agents": loaded_before},
    )
    kinds = [link(lan.hosts[i], c.ifaces[i]).get("linkinfo", {}).get("info_kind") for i in range(N)]
    check("links_are_kernel_wireguard", kinds == ["wireguard"] * N, kinds)

    # -- pings --------------------------------------------------------------------------
    overlays = {c.names[j]: ctl_json(c.socks[0], "path", c.names[j])["overlay6"] for j in range(N)}
    took = {}
    for i in range(N):
        for j in range(N):
            if i != j:
                took[f"m{i + 1}->m{j + 1}"] = round(
                    poll(lambda i=i, j=j: lan.ping(i, overlays[c.names[j]]), 60, f"ping {i}->{j}"),
                    2,
                )
    check("pings", True, took)
    mark("pings")

    # -- wg show == desired ----------------------------------------------------------------
    idents = [c.ident(i) for i in range(N)]
    b64 = __import__("base64").b64encode

    def desired(i: int, vms: dict[int, list[str]] | None = None) -> dict[str, Any]:
        peers = []
        for j in range(N):
            if j == i or c.names[j] in removed:
                continue
            path = ctl_json(c.socks[i], "path", c.names[j])
            row = next((r for r in path["paths"] if r["chosen"]), None)
            if row is None:
                raise RuntimeError(f"m{i + 1}: no chosen path to m{j + 1}: {path}")
            # The agent's rule (peerplan._wg_endpoint): a direct path's host with the
            # peer's WireGuard port; none when that port is not known.
            endpoint = None
            if row["kind"] in ("lan", "public") and row["port_wg"]:
                endpoint = f"{row['address'].rsplit(':', 1)[0]}:{row['port_wg']}"
            peers.append(
                MeshPeer(
                    idents[j].wg_public,
                    ipaddress.IPv6Address(overlays[c.names[j]]),
                    None,
                    endpoint,
                    tuple(ipaddress.IPv6Address(a) for a in (vms or {}).get(j, ())),
                )
            )
        # No machine here has a public address of its own, so each keeps every
        # NAT mapping open: a keepalive to every peer (mesh/service._behind_nat).
        want = desired_from(
            idents[i].wg_private, idents[i].wg_public, WG_PORT, peers, behind_nat=True
        )
        return {
            "private": b64(want.private_key).decode(),
            "port": want.listen_port,
            "peers": {
                b64(k).decode(): {
                    "endpoint": p.endpoint,
                    "allowed": sorted(p.allowed_ips),
                    "keepalive": str(p.keepalive) if p.keepalive else "off",
                }
                for k, p in want.peers.items()
            },
        }

    def shown(i: int) -> dict[str, Any]:
        d = wg_dump(lan.hosts[i], c.ifaces[i])
        return {
            "private": d["private"],
            "port": d["port"],
            "peers": {
                k: {x: v[x] for x in ("endpoint", "allowed", "keepalive")}
                for k, v in d["peers"].items()
            },
        }

    removed: set[str] = set()
    last: dict[int, Any] = {}
    no_endpoint: set[str] = set()  # peers the agent gives no endpoint (reported)

    def agrees(i: int, vms=None) -> bool:
        """`wg show` == the desired state.  Where the agent wants no endpoint
        (the peer's WireGuard port is not known to it: its endpoints record
        has not arrived), WireGuard keeps the one it learned from the peer's
        handshake, which is not compared (and is listed in the notes)."""
        want, got = desired(i, vms), shown(i)
        for key, p in want["peers"].items():
            if p["endpoint"] is None and key in got["peers"]:
                got["peers"][key]["endpoint"] = None
                no_endpoint.add(f"m{i + 1}->{key[:8]}")
        last[i] = {"want": want, "got": got}
        return want == got

    try:
        poll(lambda: all(agrees(i) for i in range(N)), 60, "wg show == desired")
        check("wg_show_matches_desired", True, {"m1": shown(0), "m2": shown(1), "m3": shown(2)})
    except AssertionError as exc:
        check("wg_show_matches_desired", False, {"error": str(exc), "last": last})
    mark("wg show")

    # -- a VM placed on m2 on the clan network: its /128 joins m2's allowed-ips ---------------
    inv = ctl(c.socks[0], "inventory", "show")
    kernel = sorted(Path("/boot").glob("vmlinuz-*"))[-1]  # any existing files: the
    initrd = sorted(Path("/boot").glob("initrd*"))[-1]  # fake backend boots nothing
    c.apply_inventory(
        inv + f'\n[vms.web]\nmachines = ["m2"]\nmemory_mb = 128\nnetworks = ["clan"]\n'
        f'kernel = "{kernel}"\ninitrd = "{initrd}"\n'
    )
    clan_id = load_anchor(c.homes[0] / "state").clan_id
    vm = str(vm_ip6(clan_id, "web"))
    try:
        poll(
            lambda: all(agrees(i, {1: [vm]}) for i in (0, 2)) and agrees(1),
            90,
            "the VM's /128 on m2's peer",
        )
        check("vm_route_in_allowed_ips", True, {"vm": vm, "m1 sees m2": shown(0)["peers"]})
    except AssertionError as exc:
        check("vm_route_in_allowed_ips", False, {"error": str(exc), "vm": vm, "last": last})
    mark("vm route")
    vms = {1: [vm]}

    # -- at once: m1's agent restarts (it must adopt its interface, no flap) and
    # m3 moves to another LAN address (its agent restarted too; peers must follow).
    # Together, because an agent start under TCG takes half a minute.
    before_link = link(lan.hosts[0], c.ifaces[0])
    before = wg_dump(lan.hosts[0], c.ifaces[0])
    m2_wg = b64(idents[1].wg_public).decode()
    m3_wg = b64(idents[2].wg_public).decode()
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", lan.hosts[1], "ping", "-n", "-i", "0.2", "-W", "2",
         overlays["m1"]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(1)
    t_restart = time.monotonic()
    new_ip = f"{lan.subnet}.33"
    eth = "etha2"
    c.stop_agent(0)
    c.stop_agent(2)
    sh("ip", "-n", lan.hosts[2], "addr", "del", f"{lan.ip(2)}/24", "dev", eth)
    sh("ip", "-n", lan.hosts[2], "addr", "add", f"{new_ip}/24", "dev", eth)
    c.start_agent(0)
    c.start_agent(2)
    c.wait_socket(0)

    def m1_reconciled() -> bool:
        # back, and its peer m2 as desired (m3 is moving meanwhile)
        caps = {x["name"]: x for x in ctl_json(c.socks[0], "status")["capabilities"]}
        if not caps.get("mesh.wireguard", {}).get("available"):
            return False
        agrees(0, vms)
        return last[0]["want"]["peers"][m2_wg] == last[0]["got"]["peers"].get(m2_wg)

    try:
        poll(m1_reconciled, 90, "m1 back and reconciled")
        restart_s = time.monotonic() - t_restart
        time.sleep(1)
    finally:
        pinger.send_signal(signal.SIGINT)
        ping_out = pinger.communicate(timeout=10)[0]
    after_link = link(lan.hosts[0], c.ifaces[0])
    after = wg_dump(lan.hosts[0], c.ifaces[0])
    caps = {x["name"]: x for x in ctl_json(c.socks[0], "status")["capabilities"]}
    summary = next((ln for ln in ping_out.splitlines() if "transmitted" in ln), ping_out[-300:])
    sent = int(summary.split()[0]) if summary[:1].isdigit() else 0
    got = int(summary.split(", ")[1].split()[0]) if summary[:1].isdigit() else 0
    counters = {
        k[:8]: {
            "rx": [before["peers"][k]["rx"], after["peers"].get(k, {}).get("rx")],
            "handshake": [before["peers"][k]["handshake"], after["peers"].get(k, {}).get("handshake")],
        }
        for k in before["peers"]
    }  # fmt: skip
    counters_kept = all(
        k in after["peers"]
        and after["peers"][k]["rx"] >= before["peers"][k]["rx"]
        and after["peers"][k]["handshake"] >= before["peers"][k]["handshake"] > 0
        for k in before["peers"]
    )
    detail = {
        "ifindex": [before_link["ifindex"], after_link["ifindex"]],
        "ping": summary,
        "lost": sent - got,
        "counters": counters,
        "reason": caps["mesh.wireguard"]["reason"],
        "restart_s": round(restart_s, 1),
    }
    check(
        "restart_adopts_without_flap",
        before_link["ifindex"] == after_link["ifindex"]
        and counters_kept
        and sent >= 5
        and sent - got <= 1
        and "adopted" in caps["mesh.wireguard"]["reason"],
        detail,
    )
    mark("restart")

    # -- m3's new address: m1 and m2 follow -------------------------------------------------
    c.wait_socket(2)

    def moved() -> bool:
        for i in (0, 1):
            if shown(i)["peers"][m3_wg]["endpoint"] != f"{new_ip}:{WG_PORT}":
                return False
            if not agrees(i, vms if i == 0 else None):
                return False
        return lan.ping(0, overlays["m3"])

    try:
        took_s = poll(moved, 60, "m1 and m2 to use m3's new endpoint")
        check(
            "endpoint_change_applied",
            True,
            {"seconds": round(took_s, 1), "m1 sees m3": shown(0)["peers"][m3_wg]["endpoint"]},
        )
    except AssertionError as exc:
        check("endpoint_change_applied", False, {"error": str(exc), "last": last})
    mark("endpoint change")

    # -- m3 leaves the inventory: gone from every peer list -------------------------------------
    c.apply_inventory(without_section(ctl(c.socks[0], "inventory", "show"), "machines.m3"))
    removed.add("m3")

    def gone() -> bool:
        return all(m3_wg not in shown(i)["peers"] for i in (0, 1)) and all(
            agrees(i, vms if i == 0 else None) for i in (0, 1)
        )

    try:
        took_s = poll(gone, 60, "m3 to leave every peer list")
        check(
            "removed_machine_gone",
            not lan.ping(0, overlays["m3"]),
            {"seconds": round(took_s, 1), "m1 peers": sorted(shown(0)["peers"])},
        )
    except AssertionError as exc:
        check("removed_machine_gone", False, {"error": str(exc), "last": last})
    mark("removal")
    notes["peers once without a desired endpoint"] = sorted(no_endpoint)
    notes["m2's paths to m1"] = ctl_json(c.socks[1], "path", "m1")["paths"]

    # -- m2 restarted with WireGuard turned off: the interface it left goes ---------------
    def has_link(i: int) -> bool:
        return (
            sh("ip", "-n", lan.hosts[i], "link", "show", c.ifaces[i], check=False).returncode == 0
        )

    had = has_link(1)
    c.stop_agent(1)
    kept = has_link(1)  # a stop keeps it (the next start would adopt it)
    cfg = c.homes[1] / "agent.toml"
    cfg.write_text(cfg.read_text().replace("mdns = true\n", "mdns = true\nwireguard = false\n"))
    c.start_agent(1)
    c.wait_socket(1)

    def wg_reason() -> str:
        caps = {x["name"]: x for x in ctl_json(c.socks[1], "status")["capabilities"]}
        return caps.get("mesh.wireguard", {}).get("reason", "")

    # (the mesh part reports once it ran its start, a moment after the socket)
    poll(lambda: "disabled" in wg_reason(), 60, "m2's mesh to report WireGuard off")
    reason = wg_reason()
    check(
        "wireguard_off_removes_interface",
        had and kept and not has_link(1) and "removed" in reason,
        {"before stop": had, "after stop": kept, "after start": has_link(1), "reason": reason},
    )
    mark("wireguard off")


def main() -> None:
    error = None
    c = Clan()
    try:
        c.lan.setup()
        run(c)
    except BaseException as exc:  # report whatever we got so far
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        for home in c.homes:
            for log in sorted(home.glob("agent*.log")):
                print(f"KGUEST log {log}:\n{log.read_text()[-2500:]}", flush=True)
    finally:
        for i in list(c.procs):
            with contextlib.suppress(Exception):
                c.stop_agent(i)
    mark("done")
    print(
        "KGUEST_RESULT "
        + json.dumps({"checks": checks, "timings": timings, "notes": notes, "error": error})
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
