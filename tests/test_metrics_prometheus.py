"""A real Prometheus (Debian's `prometheus`) scrapes two real agents.

The agents run in this process (a clan of two with a rotating secret), each
with `[metrics] listen` on loopback; Prometheus runs as a process with a
scrape config for both and the shipped alert rules, and the test reads
everything back through Prometheus's own HTTP API (/api/v1/query): the
series arrive, with sane values.  The shipped dashboard's every query must
parse and run there too, and the alert rules pass `promtool check rules`
and their unit tests (`promtool test rules`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import nacl.signing
import pytest
import trio

from clanagent.config import MetricsSection
from clanagent.identity import load_or_create
from clanagent.inventory import Anchor, make_version, save_anchor

from .test_inventory_agent import call, genesis, machine_entry, start
from .test_metrics import backup_service
from .test_services_agent import cfg_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MONITORING = Path(__file__).resolve().parents[1] / "docs" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


async def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = await trio.to_thread.run_sync(_get, url)
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


async def by_instance(base: str, expr: str) -> dict[str, float]:
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in await query(base, expr)}


async def eventually(check, what: str, timeout: float = 60.0):
    """Poll `check()` (async, returns a truthy result or None) until it holds."""
    with trio.fail_after(timeout):
        while True:
            try:
                got = await check()
            except (OSError, ValueError):  # Prometheus not up yet
                got = None
            if got:
                return got
            await trio.sleep(0.5)


def dashboard_queries() -> list[str]:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    return [e.replace("$instance", ".*").replace("$__rate_interval", "1m") for e in exprs]


def test_alert_rules_pass_promtool():
    if PROMTOOL is None:
        pytest.skip("promtool missing (apt-get install prometheus)")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(
            [PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


async def test_a_real_prometheus_scrapes_two_agents(tmp_path):
    if PROMETHEUS is None:
        pytest.skip("prometheus missing (apt-get install prometheus)")
    admin = nacl.signing.SigningKey.generate()
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2)}
    cfgs = {
        i: dataclasses.replace(cfg_for(tmp_path, i), metrics=MetricsSection("127.0.0.1:0"))
        for i in (1, 2)
    }
    prom_port = _free_port()
    base = f"http://127.0.0.1:{prom_port}"
    log = (tmp_path / "prometheus.log").open("wb")
    with trio.fail_after(180):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfgs[1])
            doc = genesis(admin, {f"m{i}": machine_entry(idents[i], []) for i in (1, 2)})
            doc["services"]["backup"] = backup_service()
            v1 = make_version(doc, [], int(time.time()), "backup", [admin])
            await call(a1, "inventory.submit", {"version": v1.to_wire(), "init": True})
            clan = doc["clan"]
            save_anchor(
                tmp_path / "s2",
                Anchor(clan["id"], "t", tuple(clan["admins"]), (a1.gossip.addr,), "m2"),
            )
            a2, _ = await start(n, cfgs[2])
            targets = {f"127.0.0.1:{a.metrics_http.port}": a for a in (a1, a2)}
            shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
            (tmp_path / "prometheus.yml").write_text(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "rule_files: [alerts.yml]\n"
                "scrape_configs:\n  - job_name: clanagent\n    static_configs:\n"
                f"      - targets: {json.dumps(sorted(targets))}\n"
            )
            proc = await trio.lowlevel.open_process(
                [
                    PROMETHEUS,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=log,
                stderr=log,
            )
            try:
                await check_series(base, targets)
            finally:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            n.cancel_scope.cancel()
    log.close()


async def check_series(base: str, targets: dict) -> None:
    async def both_up():
        up = await by_instance(base, 'up{job="clanagent"}')
        return up if up == dict.fromkeys(targets, 1.0) else None

    await eventually(both_up, "Prometheus scrapes both agents")

    async def secret_everywhere():
        gen = await by_instance(base, 'clanagent_secret_generation{secret="backup/repokey"}')
        return gen if gen == dict.fromkeys(targets, 1.0) else None

    await eventually(secret_everywhere, "both agents report the secret's first generation")
    alive = await by_instance(base, 'clanagent_members{state="alive"}')
    assert alive == dict.fromkeys(targets, 2.0)
    assert await by_instance(base, 'clanagent_members{state="dead"}') == dict.fromkeys(targets, 0.0)
    info = await query(base, "clanagent_info")
    assert sorted(r["metric"]["name"] for r in info) == ["m1", "m2"]
    for inst, records in (await by_instance(base, "clanagent_store_records")).items():
        assert records >= 2, inst  # the inventory and the secret, at least
    commits = await by_instance(base, "clanagent_store_commit_seconds_count")
    assert all(v >= 1 for v in commits.values()) and len(commits) == 2
    buckets = await query(base, 'clanagent_store_commit_seconds_bucket{le="+Inf"}')
    assert {r["metric"]["instance"]: float(r["value"][1]) for r in buckets} == commits
    age = await by_instance(base, 'clanagent_secret_age_seconds{secret="backup/repokey"}')
    assert all(0 <= v < 600 for v in age.values()), age
    due = await by_instance(
        base, 'clanagent_secret_next_rotation_timestamp_seconds{secret="backup/repokey"} - time()'
    )
    assert all(29 * 86400 < v <= 30 * 86400 for v in due.values()), due

    async def traffic():
        got = await by_instance(
            base, 'rate(clanagent_gossip_bytes_total{direction="out",type="all"}[5s])'
        )
        return got if len(got) == 2 and all(v > 0 for v in got.values()) else None

    await eventually(traffic, "gossip traffic shows as a rate", 30)
    # the histogram arrives whole (buckets with le labels): quantiles work
    p99 = await query(
        base,
        "histogram_quantile(0.99, sum by (le) (rate(clanagent_store_commit_seconds_bucket[1m])))",
    )
    assert len(p99) == 1
    scrapes = await by_instance(
        base, 'clanagent_status_counter{part="metrics_http",name="scrapes"}'
    )
    # a scrape counts the ones before it: after the two a rate needs, at least 1
    assert all(v >= 1 for v in scrapes.values()) and len(scrapes) == 2, scrapes
    # the shipped rules loaded, healthy, and none fires on a healthy clan
    rules = await trio.to_thread.run_sync(_get, f"{base}/api/v1/rules")
    loaded = {
        r["name"]: r["health"]
        for g in rules["data"]["groups"]
        if g["name"] == "clanagent"
        for r in g["rules"]
    }
    assert set(loaded) == {
        "ClanagentDown",
        "ClanagentMemberDead",
        "ClanagentSecretOverdue",
        "ClanagentNoPath",
    }
    await eventually(lambda: _rules_healthy(base), "every rule evaluated without error", 15)
    alerts = await trio.to_thread.run_sync(_get, f"{base}/api/v1/alerts")
    assert alerts["data"]["alerts"] == []
    # every dashboard query parses and runs; every clanagent name in the
    # dashboard and the rules is one the agents expose
    for expr in dashboard_queries():
        await query(base, expr)
    exposed = {r["metric"]["__name__"] for r in await query(base, '{__name__=~"clanagent_.+"}')}
    shipped = (MONITORING / "grafana-dashboard.json").read_text() + (
        MONITORING / "alerts.yml"
    ).read_text()
    used = set(re.findall(r"clanagent_[a-z_]+", shipped))
    # series that only exist with WireGuard running (none here) or VMs placed
    need_wireguard_or_vms = {
        "clanagent_mesh_path",
        "clanagent_mesh_probe_rtt_seconds",
        "clanagent_wireguard_handshake_age_seconds",
        "clanagent_wireguard_bytes_total",
        "clanagent_vm_state",
        "clanagent_vm_restarts_total",
    }
    assert used - exposed <= need_wireguard_or_vms, used - exposed


async def _rules_healthy(base: str) -> bool:
    rules = await trio.to_thread.run_sync(_get, f"{base}/api/v1/rules")
    states = [
        r["health"] for g in rules["data"]["groups"] if g["name"] == "clanagent" for r in g["rules"]
    ]
    return len(states) == 4 and all(s == "ok" for s in states)
