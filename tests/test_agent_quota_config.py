"""The store quotas set in the agent's config are the ones its store enforces.

Issue 12, item 4: "Records and bytes per origin are bounded (configurable)".
The quota logic is tested in tests/test_node_hostile.py and the settings'
checks in tests/test_config.py; this checks the wiring on a real agent.
"""

from __future__ import annotations

import trio

from clanagent.identity import Identity
from clanagent.wire import SignedRecord

from .test_gossip_service import make_cfg, start_agent


async def _over_quota_after(tmp_path, n: int, **gossip) -> list[str | None]:
    other = Identity.generate()
    out: list[str | None] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agent, _ = await start_agent(nursery, make_cfg(tmp_path, 1, [], **gossip))
            store = agent.store
            for i in range(n):
                rec = SignedRecord.create(other, "endpoints", f"k{i}", 1, {"i": i})
                out.append(store.over_quota(rec))
                if out[-1] is None:
                    assert store.put(rec)
            nursery.cancel_scope.cancel()
    return out


async def test_a_configured_per_origin_quota_is_the_agents(tmp_path):
    small = await _over_quota_after(tmp_path / "small", 5, max_records_per_origin=3)
    assert small[:3] == [None, None, None]
    assert small[3] is not None and small[4] is not None
    # The default leaves room for a real machine's records.
    assert await _over_quota_after(tmp_path / "default", 5) == [None] * 5


async def test_a_configured_byte_quota_is_the_agents(tmp_path):
    one = len(SignedRecord.create(Identity.generate(), "endpoints", "k0", 1, {"i": 0}).encode())
    got = await _over_quota_after(tmp_path, 3, max_bytes_per_origin=one * 3 // 2)
    assert got == [None, got[1], got[1]] and got[1] is not None
