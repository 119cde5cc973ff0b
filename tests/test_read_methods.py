"""Read-level control methods change nothing that others see (issue 12, item 3).

Every method of the API table marked "read" is called on a real agent, with
ordinary and with hostile parameters, as a member of `control.read_group`
would call it. Afterwards the agent's store holds exactly what it held
before, but for `vm-logs-request` records (the one read that asks another
machine for something), which go out at most once a second per VM.
"""

from __future__ import annotations

import trio

from clanagent.control.protocol import ControlError

from .test_gossip_service import make_cfg, start_agent

HOSTILE_PARAMS = [
    {},
    {"name": "web", "since": 0},
    {"name": "web", "since": 2**62},
    {"name": "web", "since": -(2**62)},
    {"name": "web", "since": 1.5e300},
    {"name": ["web"], "since": "now"},
    {"name": "x" * 100_000},
    {"unknown": {"deep": [1, 2, 3]}},
]


def snapshot(agent) -> dict[tuple[bytes, str, str], int]:
    return {(r.origin, r.kind, r.key): r.version for r in agent.store.records()}


async def test_read_methods_change_nothing_that_others_see(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            agent, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            reads = [h for h in agent.api.handlers(1) if h.access == "read" and not h.streaming]
            assert {"status", "vm.logs", "inventory.show", "machines"} <= {h.name for h in reads}
            await trio.sleep(0.5)  # its own start-up records are out
            before = snapshot(agent)
            outcomes: dict[str, set[str]] = {}
            for _round in range(3):
                for h in reads:
                    for params in HOSTILE_PARAMS:
                        try:
                            result = h.call(params)
                            if hasattr(result, "__await__"):
                                await result
                            outcome = "ok"
                        except (ControlError, ValueError, TypeError, KeyError) as exc:
                            # a clear refusal of bad params is fine; a crash is not
                            outcome = type(exc).__name__
                        outcomes.setdefault(h.name, set()).add(outcome)
            after = snapshot(agent)
            n.cancel_scope.cancel()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(kind == "vm-logs-request" for _o, kind, _k in changed), changed
    assert outcomes["status"] == {"ok"}
