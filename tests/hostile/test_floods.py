"""Floods and exhaustion on each listener of a real clan (issue 12, item 7).

The gossip port gets a handshake flood (thousands of HELLOs with the right
clan tag, from many connections and sources at once); the control socket
is held by unprivileged users taking every connection they may; the web
console gets hundreds of idle connections.  Throughout, every agent stays
up, root's `status` answers within 1 s, and a genuine peer or admin still
gets in within seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from .attacker import Mallory
from .conftest import MACHINES, STATUS_DEADLINE, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLOOD = 2000  # HELLOs per agent
FLOOD_CONCURRENCY = 32  # connections at once, per agent
FLOOD_SECONDS = 25  # none started after: 3 agents and 3 attackers share the test box's cores
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
GENUINE_HANDSHAKE = 5.0  # seconds a member's handshake may take under the flood


def _flood_process(addr: str, clan_id: bytes) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.hostile.attacker", "flood", addr, clan_id.hex()]
    argv += [str(FLOOD), str(FLOOD_CONCURRENCY), str(FLOOD_SECONDS), *FLOOD_SOURCES]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


async def test_a_handshake_flood_stops_no_agent_and_a_member_still_gets_in(clan):
    m = Mallory(clan.mallory, clan.clan_id)
    floods = {x: _flood_process(clan.gossip[x], clan.clan_id) for x in MACHINES}
    handshakes: dict[str, list[float]] = {x: [] for x in MACHINES}
    statuses: dict[str, list[float]] = {x: [] for x in MACHINES}

    async def genuine(x: str) -> float:
        t0 = time.monotonic()
        try:
            with trio.fail_after(10):
                async with m.session(clan.gossip[x]):
                    pass
        except Exception as exc:  # noqa: BLE001 -- a failed handshake is the finding
            print(f"genuine handshake with {x} failed: {exc!r}")
            return float("inf")
        return time.monotonic() - t0

    try:
        with trio.fail_after(120):
            while any(p.poll() is None for p in floods.values()):
                for x in MACHINES:
                    handshakes[x].append(await genuine(x))
                    statuses[x].append(await trio.to_thread.run_sync(clan.status_time, x))
                await trio.sleep(0.2)
    finally:
        for p in floods.values():
            if p.poll() is None:
                p.kill()
    results = {x: json.loads(p.communicate()[0]) for x, p in floods.items()}
    for x in results:
        r = results[x]
        print(
            f"{x}: {r['sent']} HELLOs in {r['seconds']} s ({r}); genuine handshake "
            f"max {max(handshakes[x]):.2f} s over {len(handshakes[x])}, "
            f"status max {max(statuses[x]) * 1000:.0f} ms"
        )
    for x in results:
        r = results[x]
        assert r["answered"] + r["refused"] + r["silent"] == r["sent"]
        # on a 2-core box the three agents take ~600 each in that time (one alone, ~2,000)
        assert r["sent"] >= 200, f"the attacker got only {r['sent']} HELLOs out"
        assert len(handshakes[x]) >= 2, "the flood ended before we could measure"
        assert max(handshakes[x]) < GENUINE_HANDSHAKE, (x, handshakes[x])
        assert max(statuses[x]) < STATUS_DEADLINE, (x, statuses[x])
    clan.assert_healthy()
    t0 = time.monotonic()
    wait_for(
        lambda: all(clan.members_alive(x) == set(MACHINES) for x in MACHINES),
        30,
        "every agent to see the whole clan alive after the flood",
    )
    print(f"every member alive everywhere {time.monotonic() - t0:.1f} s after the flood")
