"""An agent whose own record once got a huge version still starts and publishes.

Issue 12, item 3: "publish a record at version 2^63-1, after which its own
agent can never publish again and exits at every start".  The store and
gossip-node halves are in tests/test_node_hostile.py; this runs the whole
agent: it is stopped, its own `node-info` is rewritten in its database at
2^63-1 (as an old agent, or a disk edit, left it), and the agent must start,
set the record aside and publish its own records again below the bound.
"""

from __future__ import annotations

import sqlite3

import trio

from clanagent.store import Store, file_name
from clanagent.wire import MAX_RECORD_VERSION, RECORD_SIGNATURE_DOMAIN, SignedRecord, pack

from .test_gossip_service import make_cfg, start_agent

HUGE = 2**63 - 1


def _signed_at(ident, rec: SignedRecord, version: int) -> SignedRecord:
    """`rec` again at any version decode admits (create refuses >= 2**53)."""
    payload = pack(
        {"clan": rec.clan, "kind": rec.kind, "key": rec.key, "version": version, "body": rec.body}
    )
    return SignedRecord(rec.origin, payload, ident.sign(RECORD_SIGNATURE_DOMAIN + payload))


async def _run_once(tmp_path, then) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            agent, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            await then(agent)
            n.cancel_scope.cancel()


async def test_an_agent_whose_own_record_got_a_huge_version_starts_and_publishes(tmp_path):
    seen: dict = {}

    async def first(agent) -> None:
        me = bytes(agent.identity.public_key)
        with trio.fail_after(10):
            while agent.store.get(me, "node-info", "") is None:
                await trio.sleep(0.05)
        seen["ident"], seen["me"] = agent.identity, me
        seen["rec"] = agent.store.get(me, "node-info", "")

    await _run_once(tmp_path, first)
    rec, me = seen["rec"], seen["me"]
    huge = _signed_at(seen["ident"], rec, HUGE)
    assert huge.version == HUGE and huge.origin == me

    records = tmp_path / "s1" / "records"
    db = sqlite3.connect(records / "records.db")
    with db:
        db.execute(
            "INSERT OR REPLACE INTO records (name, data) VALUES (?, ?)",
            (file_name(me, "node-info", ""), huge.encode()),
        )
    db.close()

    async def second(agent) -> None:
        with trio.fail_after(10):
            while True:
                now = agent.store.get(me, "node-info", "")
                if now is not None and now.version > rec.version:
                    break
                await trio.sleep(0.05)
        assert now.version < MAX_RECORD_VERSION
        assert agent.store.stats["over_version"] == 1
        # and it keeps publishing: a record of a kind it makes on request
        before = agent.store.max_version(me)
        assert await agent.publish_record("node-info", "", rec.body)
        with trio.fail_after(10):  # stored once the write is done
            while agent.store.max_version(me) <= before:
                await trio.sleep(0.05)
        assert agent.store.max_version(me) < MAX_RECORD_VERSION

    await _run_once(tmp_path, second)
    on_disk = Store.open(records).get(me, "node-info", "")
    assert rec.version < on_disk.version < MAX_RECORD_VERSION
    assert any((records / "corrupt").iterdir())  # the huge one, set aside
