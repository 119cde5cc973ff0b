"""PublishGate: no (kind, key) of ours goes out faster than its kind's min_interval."""

from __future__ import annotations

import random

import trio
import trio.testing

from clanagent.agent import AgentBus
from clanagent.publish_policy import MIN_JITTER, PublishGate
from clanagent.records import min_interval


def test_a_key_waits_out_its_kinds_min_interval_and_other_keys_do_not():
    gate = PublishGate({"slow": 5.0, "free": 0.0}.get, random.Random(1))
    assert gate.wait(0.0, "slow", "a") == 0.0
    gate.published(0.0, "slow", "a")
    w = gate.wait(1.0, "slow", "a")
    assert 4.0 <= w <= 4.0 + 5.0 * MIN_JITTER
    assert gate.wait(1.0, "slow", "b") == 0.0  # per key
    assert gate.wait(1.0 + w, "slow", "a") == 0.0
    gate.published(1.0, "free", "x")
    assert gate.wait(1.0, "free", "x") == 0.0  # no floor for that kind
    assert gate.delayed == 1


def test_the_registry_gives_the_floors():
    assert min_interval("endpoints") == 5.0
    assert min_interval("no-such-kind") == 0.0


async def test_the_agent_bus_slows_a_publisher_that_floods_one_key(autojump_clock):
    sent: list[tuple[float, str, str]] = []

    class FakeAgent:
        async def publish_record(self, kind, key, body, *, push=True):
            sent.append((trio.current_time(), kind, key))
            return True

    bus = AgentBus(FakeAgent().publish_record)
    t0 = trio.current_time()
    for i in range(5):
        assert await bus.publish("endpoints", "", {"i": i})
    times = [t - t0 for t, _, _ in sent]
    assert len(times) == 5 and times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(5.0 <= g <= 5.0 * (1 + MIN_JITTER) for g in gaps), gaps
