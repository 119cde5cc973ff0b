"""Prometheus metrics: the collector over each part, `clanctl metrics`, and
`[metrics] listen` on running agents in a clan (issue 17, Metrics)."""

from __future__ import annotations

import dataclasses
import io
import random
import time
import types
from contextlib import redirect_stdout

import nacl.signing
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from clanagent._counters import OTHER, LabelCounts, LatencyHistogram
from clanagent._eventbus import EventBus
from clanagent.cli import clanctl
from clanagent.config import ConfigError, MetricsSection, load_config
from clanagent.identity import load_or_create
from clanagent.inventory import Anchor, make_version, save_anchor
from clanagent.mesh.paths import Candidate, PathSelector
from clanagent.mesh.wireguard import PeerStatus
from clanagent.metrics import MetricsApi, MetricsSources

from .test_inventory_agent import call, genesis, machine_entry, start, wait_until
from .test_services_agent import cfg_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: Samples, metric: str, /, **labels: str) -> float:
    return got[(metric, tuple(sorted(labels.items())))]


def names(got: Samples) -> set[str]:
    return {n for n, _ in got}


# -- the plain counters ------------------------------------------------------------


def test_label_counts_are_capped_and_the_histogram_is_cumulative():
    counts = LabelCounts(max_keys=3)
    for i in range(1000):
        counts.add(f"method-{i}", "ok")
    got = dict(counts.items())
    assert len(got) == 4  # three names, then everything else as one
    assert got[(OTHER, OTHER)] == 997
    h = LatencyHistogram((0.001, 0.01, 0.1))
    for s in (0.0005, 0.001, 0.005, 0.5, 2.0):
        h.observe(s)
    buckets, total, count = h.snapshot()
    assert buckets == [(0.001, 2), (0.01, 3), (0.1, 3), (float("inf"), 5)]
    assert count == 5 and total == pytest.approx(2.5065)


def test_metrics_listen_is_checked_like_every_address(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('[metrics]\nlisten = "127.0.0.1:9946"\n')
    assert load_config(f).metrics.listen == "127.0.0.1:9946"
    assert load_config(tmp_path / "none.toml").metrics.listen == ""
    f.write_text('[metrics]\nlisten = "9946"\n')
    with pytest.raises(ConfigError, match="metrics.listen"):
        load_config(f)


# -- the collector over fakes ---------------------------------------------------------


def _key(i: int) -> bytes:
    return bytes([i]) * 32


def fake_sources(**over) -> MetricsSources:
    me = types.SimpleNamespace(node_id="me", public_key=_key(1))
    inv = types.SimpleNamespace(
        doc={
            "machines": {
                "m1": {"node_key": _key(1), "wg_key": b"w1"},
                "m2": {"node_key": _key(2), "wg_key": b"w2"},
                "m3": {"node_key": _key(3), "wg_key": b"w3"},
            }
        }
    )
    base = dict(
        identity=lambda: me,
        name="m1",
        started_wall=1000.0,
        capabilities=lambda: [{"name": "wireguard", "available": True}],
        inventory=lambda: inv,
        gossip=lambda: None,
        store=lambda: None,
        mesh=lambda: None,
        secrets=lambda: None,
        vms=lambda: None,
        control=lambda: None,
        web=lambda: None,
        record_checks=lambda: None,
        events=lambda: None,
        wall=lambda: 5000.0,
    )
    base.update(over)
    return MetricsSources(**base)


def scrape(sources: MetricsSources) -> Samples:
    body, _ = MetricsApi(sources).scrape()
    return samples(body.decode())


def test_mesh_paths_rtts_and_wireguard_per_peer():
    sel = PathSelector(True, random.Random(0))
    lan = Candidate(_key(2), "lan", "192.168.1.2:51820", "mdns")
    sel.set_candidates(_key(2), [lan], ("lan", "public", "tor"), True, 0.0)
    sel.report_success(_key(2), lan, 0.004, 1.0)
    sel.set_candidates(_key(3), [], ("lan", "public", "tor"), True, 0.0)
    device = types.SimpleNamespace(
        status={b"w2": PeerStatus(last_handshake=4990.0, rx_bytes=700, tx_bytes=900)}
    )
    mesh = types.SimpleNamespace(
        stats={"paths_failed": 3, "probes_sent": 10, "probes_answered": 9, "probes_bad": 1},
        selector=sel,
        device=device,
    )
    got = scrape(fake_sources(mesh=lambda: mesh))
    assert value(got, "clanagent_mesh_path", peer="m2", kind="lan") == 1
    assert value(got, "clanagent_mesh_path", peer="m3", kind="none") == 1
    assert ("clanagent_mesh_path", (("kind", "none"), ("peer", "m1"))) not in got  # not us
    assert value(got, "clanagent_mesh_probe_rtt_seconds", peer="m2") == pytest.approx(0.004)
    assert value(got, "clanagent_wireguard_handshake_age_seconds", peer="m2") == 10.0
    assert value(got, "clanagent_wireguard_bytes_total", peer="m2", direction="rx") == 700
    assert value(got, "clanagent_wireguard_bytes_total", peer="m2", direction="tx") == 900
    assert value(got, "clanagent_mesh_failovers_total") == 3
    assert value(got, "clanagent_mesh_probes_total", result="bad") == 1
    # without WireGuard there is no path choice: no series, not "none"
    mesh.selector = None
    got = scrape(fake_sources(mesh=lambda: mesh))
    assert not [k for k in got if k[0] == "clanagent_mesh_path"]


def test_vms_of_this_machine_by_state_and_restarts():
    rows = [
        {"vm": "web", "machine": "m1", "state": "running", "crashes": 2},
        {"vm": "db", "machine": "m1", "state": "failed", "crashes": 0},
        {"vm": "far", "machine": "m2", "state": "running", "crashes": 9},
    ]
    vms = types.SimpleNamespace(my_machine=lambda: "m1", clan_vms=lambda: rows)
    got = scrape(fake_sources(vms=lambda: vms))
    assert value(got, "clanagent_vm_state", vm="web", state="running") == 1
    assert value(got, "clanagent_vm_state", vm="db", state="failed") == 1
    assert value(got, "clanagent_vm_restarts_total", vm="web") == 2
    assert not [k for k in got if dict(k[1]).get("vm") == "far"]  # another host's VM


def test_a_part_that_fails_to_report_hides_nothing_else(caplog):
    def broken():
        raise RuntimeError("a bug in one part")

    events = EventBus()
    events.publish("member.suspect", node_id="x")
    vms = types.SimpleNamespace(my_machine=broken, clan_vms=broken)
    sources = fake_sources(vms=lambda: vms, events=lambda: events)
    api = MetricsApi(sources)
    for _ in range(2):
        got = samples(api.scrape()[0].decode())
    assert value(got, "clanagent_scrape_errors_total", part="vms") == 2
    assert value(got, "clanagent_member_changes_total", change="suspect") == 1
    assert value(got, "clanagent_info", version=_version(), node_id="me", name="m1") == 1
    assert "clanagent_vm_state" not in names(got)
    assert len([r for r in caplog.records if "metrics of part vms" in r.getMessage()]) == 1


def _version() -> str:
    from clanagent import __version__

    return __version__


def test_openmetrics_on_request():
    body, ctype = MetricsApi(fake_sources()).scrape(openmetrics=True)
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# -- real agents in a clan ---------------------------------------------------------------


def backup_service() -> dict:
    return {
        "type": "backup",
        "settings": {},
        "reload": "",
        "roles": {
            "server": {
                "machines": ["m1", "m2"],
                "tags": [],
                "settings": {},
                "exports": [],
                "imports": [],
            }
        },
        "secrets": {
            "repokey": {
                "generator": "password",
                "length": 24,
                "command": "",
                "depends": [],
                "scope": "role:server",
                "rotate_days": 30,
                "secret_files": [],
                "public_files": [],
            }
        },
    }


async def http_get(port: int, path: str = "/metrics") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def clanctl_metrics(sock: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert clanctl.main(["--socket", sock, "metrics"]) == 0
    return out.getvalue()


@pytest.mark.integration
async def test_two_agents_report_every_part_over_the_socket_and_http(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2)}
    cfg1 = dataclasses.replace(cfg_for(tmp_path, 1), metrics=MetricsSection("127.0.0.1:0"))
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfg1)
            doc = genesis(admin, {f"m{i}": machine_entry(idents[i], []) for i in (1, 2)})
            doc["services"]["backup"] = backup_service()
            v1 = make_version(doc, [], int(time.time()), "backup", [admin])
            await call(a1, "inventory.submit", {"version": v1.to_wire(), "init": True})
            clan = doc["clan"]
            save_anchor(
                tmp_path / "s2",
                Anchor(clan["id"], "t", tuple(clan["admins"]), (a1.gossip.addr,), "m2"),
            )
            a2, scope2 = await start(n, cfg_for(tmp_path, 2))

            async def secret_everywhere() -> bool:
                # each holds the record: the one that did not make it checked it
                for a in (a1, a2):
                    rows = {r["id"]: r for r in await call(a, "secrets.list")}
                    if rows.get("backup/repokey", {}).get("generation") != 1:
                        return False
                return all(a.store.of_kind("secret") for a in (a1, a2))

            with trio.fail_after(30):
                while not await secret_everywhere():
                    await trio.sleep(0.1)

            text = await trio.to_thread.run_sync(clanctl_metrics, cfg1.control.socket)
            got = samples(text)
            assert value(got, "clanagent_members", state="alive") == 2
            assert value(got, "clanagent_members", state="dead") == 0
            assert value(got, "clanagent_in_clan") == 1
            assert value(got, "clanagent_membership_refutations_total") == 0
            for why in ("witness", "check", "final"):
                assert value(got, "clanagent_membership_suspect_probes_total", why=why) == 0
            for q in ("membership", "records", "records_big"):
                assert value(got, "clanagent_gossip_queue_depth", queue=q) >= 0
            assert value(got, "clanagent_gossip_messages_total", direction="in") > 0
            assert value(got, "clanagent_gossip_bytes_total", direction="out", type="all") > 0
            assert value(got, "clanagent_gossip_records_total", result="accepted") > 0
            # peers' records passed the body checks, by kind: the secret made
            # by one of the two passed the other's
            text2 = await trio.to_thread.run_sync(clanctl_metrics, a2.cfg.control.socket)
            got2 = samples(text2)
            secret_checked = [
                g.get(
                    (
                        "clanagent_record_checks_total",
                        (("kind", "secret"), ("result", "passed")),
                    ),
                    0,
                )
                for g in (got, got2)
            ]
            assert sorted(secret_checked)[1] >= 1, secret_checked
            # the store wrote (the inventory, the secret) and timed its commits
            assert value(got, "clanagent_store_writes_total") >= 2
            commits = value(got, "clanagent_store_commit_seconds_count")
            assert commits >= 1
            assert value(got, "clanagent_store_commit_seconds_bucket", le="+Inf") == commits
            assert 0 < value(got, "clanagent_store_commit_seconds_sum") < commits * 5
            assert value(got, "clanagent_store_records") >= 2
            # the secret: generation 1, young, due in 30 days
            assert value(got, "clanagent_secret_generation", secret="backup/repokey") == 1
            age = value(got, "clanagent_secret_age_seconds", secret="backup/repokey")
            assert 0 <= age < 120
            due = value(
                got, "clanagent_secret_next_rotation_timestamp_seconds", secret="backup/repokey"
            )
            assert due == pytest.approx(time.time() + 30 * 86400, abs=300)
            rotations = value(got, "clanagent_secret_rotations_total")
            assert (
                rotations
                + value(
                    samples(await trio.to_thread.run_sync(clanctl_metrics, a2.cfg.control.socket)),
                    "clanagent_secret_rotations_total",
                )
                == 1
            )  # exactly one of the two generated it
            # the HTTP listener serves the same families, and counts the socket call
            assert a1.metrics_http is not None
            status, body = await http_get(a1.metrics_http.port)
            assert status == 200
            over_http = samples(body.decode())
            ok = value(
                over_http,
                "clanagent_control_requests_total",
                surface="socket",
                method="metrics",
                result="ok",
            )
            assert ok >= 1
            assert value(over_http, "clanagent_capability_available", capability="metrics") == 1
            assert names(got) <= names(over_http)
            assert (await http_get(a1.metrics_http.port, "/nope"))[0] == 404

            # m2 stops answering: m1 suspects it, then counts it dead
            scope2.cancel()

            def seen() -> Samples:
                body, _ = a1.metrics_api.scrape()
                return samples(body.decode())

            await wait_until(
                lambda: value(seen(), "clanagent_member_changes_total", change="suspect") >= 1,
                "m1 suspects m2",
                30,
            )
            await wait_until(
                lambda: value(seen(), "clanagent_members", state="dead") == 1,
                "m1 counts m2 dead",
                30,
            )
            assert value(seen(), "clanagent_members", state="alive") == 1
            n.cancel_scope.cancel()


@pytest.mark.integration
async def test_a_taken_metrics_port_is_a_capability_not_a_stop(tmp_path):
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    cfg = dataclasses.replace(cfg_for(tmp_path, 1), metrics=MetricsSection(f"127.0.0.1:{port}"))
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            agent, _ = await start(n, cfg)
            assert agent.metrics_http is None
            caps = {c["name"]: c for c in (await call(agent, "status"))["capabilities"]}
            assert caps["metrics"]["available"] is False
            assert str(port) in caps["metrics"]["reason"]
            # the control socket still serves the metrics
            got = samples((await call(agent, "metrics"))["text"])
            assert value(got, "clanagent_capability_available", capability="metrics") == 0
            n.cancel_scope.cancel()
    taken.close()


async def test_requests_are_counted_by_surface_method_and_result(tmp_path):
    from clanagent.config import ControlConfig
    from clanagent.control.client import ClientError
    from clanagent.control.server import ControlServer

    from .test_control_api import poke_table, web_app, web_call
    from .test_control_server import call as socket_call
    from .test_web_app import Clock, login

    table, _ = poke_table()
    path = tmp_path / "ctl.sock"
    clock = Clock()
    app = web_app(table, clock)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server = ControlServer(
                path, table, ControlConfig(socket=str(path)), authorizer=lambda c: ("write", "t")
            )
            await n.start(server.serve)
            await socket_call(path, "test.poke", {"n": 1})
            await socket_call(path, "test.poke", {"n": 2})
            for method, params in (("test.poke", {"x": 1}), ("no.such." + "x" * 300, {})):
                with pytest.raises(ClientError):
                    await socket_call(path, method, params)
            session = await login(app, clock)
            await web_call(app, session, "test.poke", {"n": 3})
            await web_call(app, session, "status", {"bad": 1})
            got = scrape(
                fake_sources(control=lambda: server, web=lambda: types.SimpleNamespace(app=app))
            )
            n.cancel_scope.cancel()

    def requests(surface: str, method: str, result: str) -> float:
        return value(
            got,
            "clanagent_control_requests_total",
            surface=surface,
            method=method,
            result=result,
        )

    assert requests("socket", "test.poke", "ok") == 2
    assert requests("socket", "test.poke", "invalid_params") == 1
    # a name the caller made up is not a label: it counts as (other)
    assert requests("socket", OTHER, "unknown_method") == 1
    assert requests("web", "test.poke", "ok") == 1
    assert requests("web", "status", "invalid_params") == 1
