"""`make demo`: found a small local clan and show it working.

Three agents on loopback, each with its own state dir and control socket,
exactly as three machines would do it:

1. m1 starts and founds the clan (`clanctl clan init`), which creates the
   admin key and the first signed inventory.
2. m2 and m3 make their keys (`clanagent keygen`); the admin adds them with
   tags (`clanctl machine add`), which prints a join token; each machine
   joins with it (`clanagent join TOKEN`) and starts. Nobody types an address:
   the token carries the seed.
3. The agents find each other by gossip; `clanctl machines` and
   `clanctl peers` show the clan from any machine.
4. m3 stops; the others see it leave.
5. m1 opens its web console (`clanctl ui`): the demo prints the login URL
   and, in a terminal, keeps the clan up until Enter is pressed.

As root with wireguard-go, ip and ping installed, each machine runs in its
own network namespace on one switch and the agents also build the WireGuard
mesh: `clanctl path` shows the chosen path and every machine pings the
others' overlay addresses.  Otherwise the agents run on loopback and the
demo says what it skipped and why.  Nothing is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
MACHINES = {"m1": "server,lan", "m2": "laptop", "m3": "server,no-public"}
VPN_SERVICE = """
[services.vpn]
type = "wireguard-vpn"
[services.vpn.roles.server]
machines = ["m1"]
exports = ["address", "public_key"]
settings = { public_key = "secret:serverkey/public" }
[services.vpn.roles.client]
machines = ["m2", "m3"]
imports = ["vpn.server"]
[services.vpn.secrets.serverkey]
generator = "wireguard"
scope = "role:server"
[services.vpn.secrets.psk]
generator = "password"
length = 32
scope = "role:client"
rotate_days = 30
"""
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests._netns import Lan, agent_config, netns_missing_reason  # noqa: E402


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(
    cmd: list[str],
    *,
    show: bool = True,
    shown: str | None = None,
    stdin: str | None = None,
    quiet_output: bool = False,
) -> str:
    if show:
        print(f"$ {shown or ' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True, timeout=60, input=stdin)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        raise SystemExit(f"demo: '{shown or ' '.join(cmd)}' failed with exit code {r.returncode}")
    if show and not quiet_output and r.stdout.strip():
        print(r.stdout.rstrip(), flush=True)
    return r.stdout


def clanctl(
    sock: Path, *args: str, show: bool = True, stdin: str | None = None, quiet_output=False
) -> str:
    cmd = [PY, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args]
    return run(
        cmd,
        show=show,
        stdin=stdin,
        quiet_output=quiet_output,
        shown=f"clanctl --socket {sock.parent.name}/control.sock "
        + " ".join(a if len(a) < 60 else a[:40] + "…" for a in args),
    )


def clanagent(*args: str, show: bool = True) -> str:
    cmd = [PY, "-m", "clanagent.cli.agent_main", *args]
    return run(
        cmd,
        show=show,
        shown="clanagent " + " ".join(a if len(a) < 60 else a[:40] + "…" for a in args),
    )


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what}")


def show_web_console(sock: Path, admin_key: Path, lan: Lan | None) -> None:
    """Start m1's web console, print its login URL and keep the clan up while one looks."""
    banner("the web console: the clan's map in a browser (on m1)")
    out = clanctl(sock, "ui", "--admin-key", str(admin_key))
    url = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("web console:"))
    if lan is not None:
        from _netns_forward import NetnsForward

        port = int(url.split(":")[2].split("/")[0])
        try:
            NetnsForward(lan.hosts[0], port).start()
            print(
                f"(m1 runs in its own network namespace: 127.0.0.1:{port} of this host is forwarded into it)"
            )
        except OSError as exc:
            print(
                f"cannot forward port {port} from this host into m1's namespace ({exc.strerror}): "
                "run CLANAGENT_DEMO_LOOPBACK=1 make demo to look at the console"
            )
    if sys.stdin.isatty():
        print("\nThe clan keeps running while you look. Press Enter to stop it and clean up.")
        try:
            input()
        except (EOFError, KeyboardInterrupt):
            pass
    else:
        print(
            "\n(no terminal: the demo clan stops now and the link with it; run 'make demo' "
            "in a terminal to keep the clan up while you look)"
        )


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="clanagent-demo-"))
    work.chmod(0o755)
    procs: dict[str, subprocess.Popen] = {}
    homes = {m: work / m for m in MACHINES}
    socks = {m: homes[m] / "control.sock" for m in MACHINES}
    admin_key = work / "admin.key"
    skipped = netns_missing_reason()
    if os.environ.get("CLANAGENT_DEMO_LOOPBACK") == "1":
        skipped = "CLANAGENT_DEMO_LOOPBACK=1"
    lan = None if skipped else Lan(len(MACHINES), prefix=f"cd{os.getpid() % 10000}")
    names = list(MACHINES)

    def start(m: str) -> None:
        argv = [
            PY,
            "-m",
            "clanagent.cli.agent_main",
            "run",
            "--config",
            str(homes[m] / "agent.toml"),
        ]
        if lan is not None:
            procs[m] = lan.spawn(names.index(m), argv, homes[m] / "agent.log")
        else:
            with (homes[m] / "agent.log").open("w") as log:
                procs[m] = subprocess.Popen(argv, stderr=log)
        wait_for(lambda: socks[m].exists(), 15, f"agent {m} to start")

    try:
        if lan is not None:
            banner("three network namespaces on one switch (10.88.0.0/24), WireGuard on")
            lan.setup()
        else:
            banner(f"agents on loopback; skipped the WireGuard mesh in namespaces: {skipped}")
        for m in MACHINES:
            homes[m].mkdir()
            if lan is not None:
                agent_config(homes[m], m, f"{lan.prefix}w{names.index(m) + 1}")
                continue
            (homes[m] / "agent.toml").write_text(
                f'state_dir = "{homes[m] / "state"}"\n'
                f'runtime_dir = "{homes[m] / "run"}"\n'
                f'[control]\nsocket = "{socks[m]}"\n'
                f'[gossip]\nlisten = "127.0.0.1:0"\nprofile = "local"\nname = "{m}"\n'
                # on loopback: no mDNS on the host's LAN, no WireGuard interfaces
                "[mesh]\nwireguard = false\nmdns = false\n"
                # any free port for the web console: the demo prints its URL
                "[web]\nport = 0\n"
            )

        banner("m1 starts and founds the clan 'demo'")
        start("m1")
        clanctl(
            socks["m1"],
            "clan",
            "init",
            "demo",
            "--admin-key",
            str(admin_key),
            "--machine",
            "m1",
            "--tags",
            MACHINES["m1"],
        )

        for m in ("m2", "m3"):
            banner(f"{m}: make keys, get added by the admin, join with the token, start")
            out = clanagent("keygen", "--state-dir", str(homes[m] / "state"))
            key = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("machine key"))
            added = clanctl(
                socks["m1"],
                "machine",
                "add",
                m,
                "--key",
                key,
                "--tags",
                MACHINES[m],
                "--admin-key",
                str(admin_key),
                "--yes",
            )
            token = next(
                ln.split()[-1]
                for ln in added.splitlines()
                if ln.strip().startswith("clanagent join")
            )
            clanagent("join", token, "--state-dir", str(homes[m] / "state"))
            start(m)

        def all_online() -> bool:
            for m in MACHINES:
                rows = json.loads(clanctl(socks[m], "--json", "machines", show=False))
                if len(rows) != len(MACHINES) or not all(r["online"] for r in rows):
                    return False
            return True

        t0 = time.monotonic()
        wait_for(all_online, 40, "every machine to see every machine online")
        print(
            f"\nevery machine sees all {len(MACHINES)} online "
            f"{time.monotonic() - t0:.1f} s after the last one started"
        )

        banner("the clan, seen from m2")
        clanctl(socks["m2"], "machines")
        for m in MACHINES:
            banner(f"peers seen by {m}")
            clanctl(socks[m], "peers")
        if lan is not None:
            banner("the WireGuard mesh")
            clanctl(socks["m1"], "path", "m2")
            for m in names:
                for other in names:
                    if m == other:
                        continue
                    ip6 = json.loads(clanctl(socks[m], "--json", "path", other, show=False))[
                        "overlay6"
                    ]
                    took = None
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 30:
                        if lan.ping(names.index(m), ip6):
                            took = time.monotonic() - t0
                            break
                        time.sleep(0.2)
                    if took is None:
                        raise SystemExit(f"demo: {m} cannot ping {other} over WireGuard")
                    print(f"{m} -> {other}  ping {ip6} over WireGuard: ok")
        banner("the signed inventory (endpoints would travel sealed) and its history")
        clanctl(socks["m3"], "inventory", "show")
        clanctl(socks["m3"], "inventory", "history")

        banner("a service with a shared secret and an export, wired on every machine")
        inv = work / "inventory.toml"
        inv.write_text(clanctl(socks["m1"], "inventory", "show", show=False) + VPN_SERVICE)
        print(VPN_SERVICE.strip())
        clanctl(
            socks["m1"],
            "inventory",
            "apply",
            str(inv),
            "--admin-key",
            str(admin_key),
            "--yes",
            "-m",
            "vpn service",
        )

        def wired() -> bool:
            for m in ("m2", "m3"):
                env = homes[m] / "run" / "services" / "vpn" / "imports.env"
                psk = homes[m] / "run" / "secrets" / "vpn" / "psk" / "password"
                if not (env.exists() and "PUBLIC_KEY" in env.read_text() and psk.exists()):
                    return False
            return True

        wait_for(wired, 40, "the service to be wired on every machine")
        clanctl(socks["m2"], "services")
        clanctl(socks["m3"], "secrets", "list")
        clanctl(socks["m1"], "secrets", "status", "vpn/psk")
        clanctl(socks["m1"], "secrets", "show-public", "vpn/serverkey")
        for m in ("m2", "m3"):
            env = homes[m] / "run" / "services" / "vpn" / "imports.env"
            psk = homes[m] / "run" / "secrets" / "vpn" / "psk" / "password"
            digest = hashlib.sha256(psk.read_bytes()).hexdigest()[:16]
            print(f"\n{m}: {env.relative_to(work)}")
            print("  " + env.read_text().strip().replace("\n", "\n  "))
            print(
                f"{m}: {psk.relative_to(work)} mode {oct(psk.stat().st_mode & 0o777)}, "
                f"sha256 {digest}… (the same on both clients; the value is never shown)"
            )

        from clanagent.vmhost.image import build_image, image_problem

        vm_skip = image_problem()
        if vm_skip:
            banner(f"micro VMs skipped: {vm_skip}")
        else:
            banner("a micro VM placed on m1 by the inventory; seen from every machine")
            kernel, initrd = build_image(work / "image")
            # In namespaces the VM also joins the clan overlay (a routed tap on m1);
            # on loopback it gets no NIC: a tap there would be the host's own.
            vm_net = 'networks = ["clan"]\n' if lan is not None else ""
            vm_toml = (
                f'\n[vms.hello]\nmachines = ["m1"]\nmemory_mb = 128\n{vm_net}'
                f'kernel = "{kernel}"\ninitrd = "{initrd}"\n'
            )
            print(vm_toml.strip())
            inv.write_text(clanctl(socks["m1"], "inventory", "show", show=False) + vm_toml)
            clanctl(
                socks["m1"],
                "inventory",
                "apply",
                str(inv),
                "--admin-key",
                str(admin_key),
                "--yes",
                "-m",
                "a micro VM",
            )

            def vm_running_seen_from_m2() -> bool:
                rows = json.loads(clanctl(socks["m2"], "--json", "vm", "list", show=False))
                return any(r["vm"] == "hello" and r["state"] == "running" for r in rows)

            wait_for(vm_running_seen_from_m2, 60, "the VM to run (as seen from m2)")
            clanctl(socks["m2"], "vm", "list")
            console = homes["m1"] / "state" / "vms" / "hello" / "console.log"
            wait_for(lambda: b"VM_READY" in console.read_bytes(), 30, "the guest to boot")
            clanctl(socks["m3"], "vm", "logs", "hello")  # from another machine, over the mesh
            if lan is not None:
                banner("the VM is on the clan overlay: m2 pings it over WireGuard")
                rows = json.loads(clanctl(socks["m2"], "--json", "vm", "list", show=False))
                vm_ip6 = next(r["overlay"] for r in rows if r["vm"] == "hello")
                net_ready = f"VM_NET_READY {vm_ip6}".encode()
                wait_for(lambda: net_ready in console.read_bytes(), 30, "the guest's clan NIC")
                t0 = time.monotonic()
                wait_for(lambda: lan.ping(names.index("m2"), vm_ip6), 30, "m2 to ping the VM")
                print(
                    f"m2 -> VM hello  ping {vm_ip6} over WireGuard: ok "
                    f"({time.monotonic() - t0:.1f} s; m1 routes it to the VM's tap)"
                )
            # An interactive serial console, here fed from a pipe: from m3 it
            # goes over the mesh to m1's agent (in loopback mode: m1's own VM).
            who = "m3" if lan is not None else "m1"
            banner(f"the VM's serial console, opened from {who} (interactive on a terminal)")
            typed = ["uname -sr", "cut -d' ' -f1 /proc/uptime"]
            if lan is not None:
                m3_ip6 = json.loads(clanctl(socks["m1"], "--json", "path", "m3", show=False))[
                    "overlay6"
                ]
                typed.append(f"ping -c1 -W3 {m3_ip6}")  # the VM reaches m3 over the overlay
            print(f"(typed into the console, one line each: {'; '.join(typed)})")
            out = clanctl(
                socks[who],
                "vm",
                "console",
                "hello",
                "--admin-key",
                str(admin_key),
                "--linger",
                "4",
                stdin="\n".join(typed) + "\n",
                quiet_output=True,
            )
            # the guest shell's terminal queries (ESC [ 6 n) are not for a log
            out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).replace("\r", "")
            print(out.rstrip())
            if "Linux" not in out:
                raise SystemExit("demo: the VM's console did not answer")

        banner("m3 stops (SIGTERM: it leaves gracefully)")
        procs["m3"].send_signal(signal.SIGTERM)
        procs["m3"].wait(timeout=10)

        def m3_gone() -> bool:
            rows = json.loads(clanctl(socks["m1"], "--json", "machines", show=False))
            return any(r["name"] == "m3" and not r["online"] for r in rows)

        wait_for(m3_gone, 30, "m1 to notice m3 left")
        clanctl(socks["m1"], "machines")
        show_web_console(socks["m1"], admin_key, lan)
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        # VMs outlive their agent on purpose (a restart adopts them): stop the demo's.
        for pidfile in work.glob("*/state/vms/*/vmm.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        if lan is not None:
            lan.teardown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
