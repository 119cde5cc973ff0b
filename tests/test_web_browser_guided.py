"""The console's guided edits in a real headless Chromium, on a live clan.

Three agents on loopback (as in test_web_browser.py).  Through the page, the
browser adds a fourth machine: a bad key is refused beside its field, then the
key `clanagent keygen` printed on the new machine is pasted, the change is
previewed and signed.  The test reads the join command from the page, decodes
the QR code from a screenshot with zbar (`zbarimg`, Debian's zbar-tools) and
checks it carries the same token, runs `clanagent join TOKEN` for the new
state dir and starts a fourth agent there; the page says it joined, with its
path and RTT, and the map shows four machines.  Then the page removes it
(the confirmation lists what follows) and the test checks every agent cut it
off.  Last, the page gives the vpn service's client role to a tag: the live
preview says where it lands and which secrets are made for whom, and the test
checks the agents then do exactly that.  Screenshots go to the artifacts
directory; CLAN_UPDATE_SCREENSHOT=1 copies them to docs/.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nacl.signing
import pytest
import trio

from clanagent.identity import load_or_create
from clanagent.inventory import Anchor, make_version, save_anchor
from clanagent.inventory.token import parse_token

from .test_inventory_agent import call, genesis, machine_entry, start, wait_until
from .test_web_browser import (
    CHROME_FLAGS,
    CHROMEDRIVER,
    CHROMIUM,
    ROOT,
    _browser_missing,
    artifacts_dir,
    cfg_for,
    vpn_service,
    webdriver,
)

if webdriver is not None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ZBARIMG = shutil.which("zbarimg")
DOCS_SHOTS = (
    "web-add-machine.png",
    "web-add-machine-joined.png",
    "web-remove-machine.png",
    "web-apply-service.png",
    "web-apply-service-moved.png",
)


def _missing() -> str | None:
    why = _browser_missing()
    if why:
        return why
    if ZBARIMG is None:
        return "needs zbarimg to read the QR code (apt install zbar-tools)"
    return None


def clanagent_cli(*args: str) -> str:
    """Run the `clanagent` command as the new machine's admin would (blocking)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.agent_main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    return out.stdout


def zbar_decode(png: Path) -> list[str]:
    out = subprocess.run(
        [ZBARIMG, "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", str(png)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [line for line in out.stdout.splitlines() if line]


class Page:
    """One Chromium session, driven from worker threads step by step."""

    def __init__(self, out: Path) -> None:
        opts = Options()
        opts.binary_location = CHROMIUM
        for flag in CHROME_FLAGS:
            opts.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        self.wait = WebDriverWait(
            self.driver,
            30,
            poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException,),
        )
        self.out = out

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        for _ in range(20):
            try:
                return self.find(css).text
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{css} kept being replaced")

    def click(self, css: str) -> None:
        for _ in range(20):
            try:
                el = self.find(css)
                self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
                el.click()
                return
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{css} kept being replaced")

    def type(self, css: str, text: str) -> None:
        el = self.find(css)
        el.clear()
        el.send_keys(text)

    def shot(self, name: str, css: str | None = None) -> Path:
        if css:
            self.driver.execute_script(
                "document.querySelector(arguments[0]).scrollIntoView({block: 'start'})", css
            )
        path = self.out / name
        self.driver.save_screenshot(str(path))
        return path

    def fail(self) -> None:
        self.shot("web-guided-failure.png")
        (self.out / "web-guided-failure.txt").write_text(
            self.driver.find_element(By.TAG_NAME, "body").text
            + "\n\nbrowser log:\n"
            + "\n".join(str(e) for e in self.driver.get_log("browser"))
        )

    def quit(self) -> None:
        self.driver.quit()

    # -- the steps -------------------------------------------------------------------

    def add_machine(self, url: str, key: str) -> dict:
        seen: dict = {}
        d = self.driver
        d.get(url)
        origin = url.split("/login")[0]
        # let the test read back what the copy button wrote
        d.execute_cdp_cmd(
            "Browser.grantPermissions",
            {"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
        )
        self.wait.until(lambda _: self.text("#conn") == "live")
        self.wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#map g.node")) == 3)
        self.click('nav button[data-tab="machines"]')
        # errors where they happen: a name in use, a mistyped key
        self.type("#am-name", "m1")
        self.wait.until(lambda _: "already a machine" in self.text('[data-field="name"]'))
        self.type("#am-name", "m4")
        self.type("#am-key", key[:-4])
        self.wait.until(lambda _: "mistyped" in self.text('#add-machine [data-field="key"]'))
        seen["key_error"] = self.text('#add-machine [data-field="key"]')
        assert not self.find("#am-sign").is_enabled()
        self.type("#am-key", key)
        self.click('#am-tags-known button[data-tag="server"]')  # an existing tag, offered
        self.wait.until(lambda _: "+ machines.m4" in self.text("#am-diff"))
        self.wait.until(lambda _: self.find("#am-sign").is_enabled())
        seen["diff"] = self.text("#am-diff")
        seen["gets"] = self.text("#am-gets")
        self.shot("web-add-machine.png", "#add-machine")
        self.click("#am-sign")
        self.wait.until(lambda _: self.find("#am-result").is_displayed())
        self.wait.until(lambda _: self.text("#am-command").startswith("clanagent join clan1."))
        seen["command"] = self.text("#am-command")
        seen["token"] = self.find("#am-result").get_attribute("data-token")
        seen["waiting"] = self.text("#am-wait")
        self.click("#am-copy")
        self.wait.until(
            lambda _: "copied" in self.text("#toast") or "selected" in self.text("#toast")
        )
        toast = self.text("#toast")
        # headless Chromium may refuse the clipboard: the page then selects the command
        seen["copied"] = d.execute_script(
            "return arguments[0] ? navigator.clipboard.readText() : String(window.getSelection())",
            "copied" in toast,
        )
        seen["copy_toast"] = toast
        self.wait.until(
            lambda _: d.execute_script(
                "const i = document.querySelector('#am-qr');return i.complete && i.naturalWidth > 0"
            )
        )
        # the QR code, read back from a screenshot of the page
        self.driver.execute_script(
            "document.querySelector('#am-result').scrollIntoView({block: 'center'})"
        )
        seen["qr_page"] = zbar_decode(self.shot("web-add-machine-qr.png"))
        qr = self.find("#am-qr")
        qr.screenshot(str(self.out / "web-qr.png"))
        seen["qr_element"] = zbar_decode(self.out / "web-qr.png")
        return seen

    def wait_joined(self) -> dict:
        d = self.driver
        self.wait.until(lambda _: self.find("#am-wait").get_attribute("data-joined") == "m4")
        self.wait.until(lambda _: self.find("#am-wait").get_attribute("data-rtt"))
        text = self.text("#am-wait")
        self.shot("web-add-machine-joined.png", "#am-result")
        self.click('nav button[data-tab="map"]')
        self.wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#map g.node")) == 4)
        nodes = d.execute_script(
            "return [...document.querySelectorAll('#map g.node')].map(e => e.dataset.machine)"
        )
        return {"joined": text, "map": sorted(nodes)}

    def remove_machine(self) -> dict:
        d = self.driver
        self.click('nav button[data-tab="machines"]')
        self.click('#machines-table button[data-action="remove"][data-machine="m4"]')
        self.wait.until(
            lambda _: d.find_elements(By.CSS_SELECTOR, "#rm-consequences li[data-kind]")
        )
        self.wait.until(lambda _: self.find("#rm-sign").is_enabled())
        seen = {
            "consequences": self.text("#rm-consequences"),
            "diff": self.text("#rm-diff"),
            "no_remove_self": not d.find_elements(
                By.CSS_SELECTOR, '#machines-table button[data-action="remove"][data-machine="m1"]'
            ),
        }
        self.shot("web-remove-machine.png", "#remove-panel")
        self.click("#rm-sign")
        self.wait.until(lambda _: self.find("#rm-state").get_attribute("data-left") == "m4")
        return seen

    def apply_service(self) -> dict:
        d = self.driver
        self.click('nav button[data-tab="services"]')
        self.wait.until(
            lambda _: d.find_elements(By.CSS_SELECTOR, '#as-service option[value="vpn"]')
        )
        self.wait.until(
            lambda _: d.find_elements(By.CSS_SELECTOR, '#as-roles tr[data-role="client"]')
        )
        row = '#as-roles tr[data-role="client"]'
        # a tag that matches nothing: shown on that role's field, nothing to sign
        self.type(f"{row} input.role-machines", "")
        self.type(f"{row} input.role-tags", "nobody")
        self.wait.until(lambda _: "matches no machine" in self.text(f"{row} td:nth-child(2)"))
        assert not self.find("#as-sign").is_enabled()
        self.type(f"{row} input.role-tags", "laptop")
        self.wait.until(
            lambda _: self.text('#as-roles td[data-lands="client"]') == "m2 (was: m2, m3)"
        )
        self.wait.until(lambda _: self.find("#as-sign").is_enabled())
        seen = {
            "lands": {
                r: self.text(f'#as-roles td[data-lands="{r}"]') for r in ("client", "server")
            },
            "secrets": d.execute_script(
                "return Object.fromEntries([...document.querySelectorAll('#as-secrets tr[data-secret]')]"
                ".map(r => [r.dataset.secret, [...r.children].map(c => c.textContent)]))"
            ),
            "wiring": self.text("#as-wiring"),
            "diff": self.text("#as-diff"),
        }
        self.shot("web-apply-service.png", "#apply-service")
        return seen

    def sign_service(self) -> dict:
        """Sign after another admin moved the head: refused, re-diff, then sign."""
        d = self.driver
        seen: dict = {}
        self.click("#as-sign")
        self.wait.until(lambda _: "changed since" in self.text("#as-error"))
        seen["refused"] = self.text("#as-error")
        assert self.find("#as-rediff").is_displayed()
        assert not self.find("#as-sign").is_enabled()  # only after a re-diff
        self.shot("web-apply-service-moved.png", "#apply-service")
        self.click("#as-rediff")
        self.wait.until(lambda _: not self.find("#as-error").is_displayed())
        self.wait.until(lambda _: self.find("#as-sign").is_enabled())
        seen["rediff"] = self.text("#as-diff")
        self.click("#as-sign")
        self.wait.until(lambda _: "applied vpn" in self.text("#as-state"))
        seen["console_errors"] = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
        return seen


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_add_remove_and_apply_through_the_page(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    key_file = tmp_path / "admin.key"
    key_file.write_text(base64.b64encode(bytes(admin)).decode() + "\n")
    key_file.chmod(0o600)
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2, 3)}
    doc = genesis(
        admin,
        {
            "m1": machine_entry(idents[1], ["server"]),
            "m2": machine_entry(idents[2], ["laptop"]),
            "m3": machine_entry(idents[3], ["server"]),
        },
    )
    doc["services"]["vpn"] = vpn_service()
    version = make_version(doc, [], int(time.time()), "guided test", [admin])
    out = artifacts_dir()
    # the new machine: `clanagent keygen` prints the key its admin pastes
    printed = await trio.to_thread.run_sync(
        clanagent_cli, "keygen", "--state-dir", str(tmp_path / "s4")
    )
    key = next(line.split()[-1] for line in printed.splitlines() if line.startswith("machine key:"))
    page = await trio.to_thread.run_sync(Page, out)
    try:
        with trio.fail_after(150):
            async with trio.open_nursery() as n:
                a1, _ = await start(n, cfg_for(tmp_path, 1))
                await call(a1, "inventory.submit", {"version": version.to_wire(), "init": True})
                for i in (2, 3):
                    save_anchor(
                        tmp_path / f"s{i}",
                        Anchor(
                            doc["clan"]["id"],
                            "test",
                            tuple(doc["clan"]["admins"]),
                            (a1.gossip.addr,),
                            f"m{i}",
                        ),
                    )
                a2, _ = await start(n, cfg_for(tmp_path, 2))
                a3, _ = await start(n, cfg_for(tmp_path, 3))
                await wait_until(
                    lambda: (
                        sum(m["online"] for m in a1.topology.view()["machines"]) == 3
                        and ({r["id"]: r for r in a1.secrets.rows()}.get("vpn/psk") or {}).get(
                            "generation"
                        )
                    ),
                    "three machines online, the vpn secrets made",
                    45,
                )
                opened = await call(a1, "ui.open", {"admin_key": str(key_file)})

                # 1. add m4 through the page
                seen = await trio.to_thread.run_sync(page.add_machine, opened["url"], key)
                assert "mistyped" in seen["key_error"]
                assert "+ machines.m4" in seen["diff"]
                assert "m4 will hold" in seen["gets"]
                token = seen["token"]
                assert seen["command"] == f"clanagent join {token}"
                assert parse_token(token).machine == "m4"
                assert seen["qr_element"] == [token], seen["qr_element"]
                assert seen["qr_page"] == [token], seen["qr_page"]
                assert seen["waiting"].startswith("waiting for m4 to join")
                assert seen["copied"] == seen["command"], seen["copy_toast"]
                shown = await call(a1, "inventory.show")
                assert shown["doc"]["machines"]["m4"]["tags"] == ["server"]
                # on the new machine: the command the page showed, then the agent
                joined = await trio.to_thread.run_sync(
                    clanagent_cli, *seen["command"].split()[1:], "--state-dir", str(tmp_path / "s4")
                )
                assert "as machine 'm4'" in joined
                a4, s4 = await start(n, cfg_for(tmp_path, 4))
                seen = await trio.to_thread.run_sync(page.wait_joined)
                assert seen["joined"].startswith("m4 joined, path: LAN"), seen["joined"]
                assert seen["joined"].endswith(" ms")
                assert seen["map"] == ["m1", "m2", "m3", "m4"]

                # 2. remove it: the confirmation lists what follows, then it is cut off
                seen = await trio.to_thread.run_sync(page.remove_machine)
                assert "closes its sessions with it" in seen["consequences"]
                assert "WireGuard" in seen["consequences"]
                assert "- machines.m4" in seen["diff"]
                assert seen["no_remove_self"]
                m4_id = load_or_create(tmp_path / "s4")[0]
                for a in (a1, a2, a3):
                    await wait_until(
                        lambda a=a: (
                            m4_id.node_id not in a.gossip._links
                            and a.admit_peer(m4_id.public_key) is False
                        ),
                        f"m4 cut off at {a.cfg.gossip.name}",
                        30,
                    )
                s4.cancel()

                # 3. the vpn client role to tag "laptop": the preview, then the agents
                psk_before = {r["id"]: r for r in await call(a1, "secrets.list")}["vpn/psk"]
                seen = await trio.to_thread.run_sync(page.apply_service)
                assert seen["lands"]["client"] == "m2 (was: m2, m3)"
                assert seen["lands"]["server"] == "m1"
                assert seen["secrets"]["vpn/psk"][1] == "m2"
                assert seen["secrets"]["vpn/psk"][3] == "rotated"
                assert seen["secrets"]["vpn/serverkey"][1:4:2] == ["m1", "unchanged"]
                assert "vpn.server" in seen["wiring"] and "m2" in seen["wiring"]
                assert "services.vpn.roles.client.tags" in seen["diff"], seen["diff"]
                # meanwhile another admin changes the inventory: the page must not sign
                shown = await call(a1, "inventory.show")
                other = copy.deepcopy(shown["doc"])
                other["machines"]["m3"]["tags"] = ["db", "server"]
                moved = make_version(
                    other, shown["leaves"], int(time.time()), "other admin", [admin]
                )
                await call(a1, "inventory.submit", {"version": moved.to_wire(), "init": False})
                seen = await trio.to_thread.run_sync(page.sign_service)
                assert "review the new diff" in seen["refused"]
                assert "services.vpn.roles.client.tags" in seen["rediff"]
                assert "m3.tags" not in seen["rediff"]  # the other admin's change is the base
                assert seen["console_errors"] == [], seen["console_errors"]
                history = await call(a1, "inventory.history")
                assert history[0]["message"] == "apply service vpn (web console)"
                assert history[1]["message"] == "other admin"
                # what the agents then do matches the preview
                svc = {s["service"]: s for s in await call(a1, "services")}["vpn"]
                roles = {r["role"]: r["machines"] for r in svc["roles"]}
                assert roles == {"client": ["m2"], "server": ["m1"]}

                async def psk():
                    return {r["id"]: r for r in await call(a1, "secrets.list")}["vpn/psk"]

                with trio.fail_after(30):
                    while True:
                        row = await psk()
                        if (row["generation"] or 0) > psk_before["generation"] and row[
                            "recipients"
                        ] == ["m2"]:
                            break
                        await trio.sleep(0.2)
                assert row["holders"] == ["m2"]
                n.cancel_scope.cancel()
    except BaseException:
        await trio.to_thread.run_sync(page.fail)
        raise
    finally:
        await trio.to_thread.run_sync(page.quit)
    if os.environ.get("CLAN_UPDATE_SCREENSHOT") == "1":
        for name in DOCS_SHOTS:
            shutil.copy(out / name, ROOT / "docs" / name)
