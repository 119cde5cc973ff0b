"""Runs in the systemd guest under the lines of clanagent.service (a oneshot copy).

Owns: calling the agent's own code for what the unit's hardening might
forbid and printing {name: [ok, detail]} as JSON on stdout:
- vm_tap: a persistent tap with the clan gateway address (vmhost/network.py
  makes one per VM NIC through mesh/netlink.py: /dev/net/tun, CAP_NET_ADMIN);
- ipv6_forwarding: `enable_ipv6_forwarding()` turns net.ipv6.conf.all.forwarding
  on (guest.py turned it off first) under ProtectKernelTunables;
- generator_sandbox: a `command` generator runs as nobody in a fresh network
  namespace (secrets/generators.py: `unshare --net --setuid --setgid`;
  /proc/net/dev lists the namespace's links; needs
  RestrictNamespaces to allow net, and CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID).

Must never: leave the tap behind (it is removed at the end).
"""

from __future__ import annotations

import json
import pwd

from clanagent.mesh import netlink
from clanagent.secrets.generators import run_command
from clanagent.vmhost.network import enable_ipv6_forwarding

TAP = "clanprobe0"
FORWARDING = "/proc/sys/net/ipv6/conf/all/forwarding"
out: dict[str, list] = {}

try:
    netlink.ensure_tap_sync(TAP)
    netlink.ensure_address_sync(TAP, "fe80::1/64")
    out["vm_tap"] = [True, f"{TAP} up with fe80::1/64"]
except Exception as e:  # noqa: BLE001 - reported
    out["vm_tap"] = [False, repr(e)]

try:
    enable_ipv6_forwarding()
    with open(FORWARDING) as f:
        value = f.read().strip()
    out["ipv6_forwarding"] = [value == "1", f"{FORWARDING} = {value}"]
except Exception as e:  # noqa: BLE001 - reported
    out["ipv6_forwarding"] = [False, repr(e)]

try:
    got = run_command(
        'id -u > "$out/uid" && tail -n +3 /proc/net/dev | cut -d: -f1 > "$out/links"',
        ["uid"],
        ["links"],
    )
    uid = got.secret["uid"].decode().strip()
    links = got.public["links"].decode().split()
    nobody = str(pwd.getpwnam("nobody").pw_uid)
    out["generator_sandbox"] = [uid == nobody and links == ["lo"], f"uid {uid}, links {links}"]
except Exception as e:  # noqa: BLE001 - reported
    out["generator_sandbox"] = [False, repr(e)]

try:
    netlink.remove_link_sync(TAP)
except Exception:  # noqa: BLE001, S110 - best effort
    pass
print(json.dumps(out), flush=True)
