"""control.read_group on a real agent, called by a real uid in that group.

Issue 12, item 6: read-only members "can connect and read, nothing else".
tests/test_control_groups.py checks the socket and one write method against a
fake agent; here a real agent serves a real user of the read group every
method of the API table on one connection: every write method is refused as
permission_denied, every read answers (or refuses bad params), and the
agent's records are what they were.
"""

from __future__ import annotations

import dataclasses
import shutil

import trio

from clanagent.agent import Agent
from clanagent.config import ControlConfig
from clanagent.control.protocol import encode_frame
from clanagent.wire import unpack

from . import _as_user
from .test_control_groups import OPS, READER, VIEW, users  # noqa: F401 (a fixture)
from .test_gossip_service import make_cfg, start_agent


def snapshot(agent) -> dict:
    return {(r.origin, r.kind, r.key): r.version for r in agent.store.records()}


async def test_a_read_group_member_reads_every_read_method_and_writes_nothing(users):  # noqa: F811
    where = _as_user.shared_dir("clanctl-readgroup-")
    path = where / "ctl.sock"
    tmp = where / "agent"
    tmp.mkdir()
    cfg = make_cfg(tmp, 1, [])
    cfg = dataclasses.replace(
        cfg, control=ControlConfig(socket=str(path), group=OPS, read_group=VIEW)
    )
    # the agent's table as the control socket offers it
    table = {h.name: h for h in Agent(cfg).api.handlers(1, "socket")}
    # Streaming reads (the event stream) never end by themselves: left out.
    methods = sorted(name for name, h in table.items() if not h.streaming)
    writes = {name for name, h in table.items() if h.access == "write"}
    assert writes and {"inventory.submit", "invite", "vm.request"} <= writes
    frames = [
        encode_frame({"id": i, "v": 1, "method": m, "params": {}}) for i, m in enumerate(methods, 1)
    ]
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                agent, _ = await start_agent(n, cfg)
                await trio.sleep(0.5)  # its own start-up records are out
                before = snapshot(agent)
                lines = await trio.to_thread.run_sync(
                    _as_user.call_as, users[READER], path, *frames
                )
                after = snapshot(agent)
                counters = agent.control.counters()
                n.cancel_scope.cancel()
    finally:
        shutil.rmtree(where, ignore_errors=True)
    replies = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        assert word == "REPLY", lines
        reply = unpack(bytes.fromhex(rest))
        replies[methods[reply["id"] - 1]] = reply
    assert set(replies) == set(methods), set(methods) - set(replies)
    for name, reply in replies.items():
        code = None if reply["ok"] else reply["error"]["code"]
        if name in writes:
            assert code == "permission_denied", (name, reply)
        else:
            assert code != "permission_denied", (name, reply)
    assert replies["status"]["ok"] and replies["machines"]["ok"]
    assert counters["denied_write"] == len(writes & set(methods))
    assert after == before
