// clan console: plain JavaScript, no framework, no build step.
// Every action goes over one WebSocket (/api) as a control API request:
// {id, method, params} -> {id, ok, result} | {id, ok: false, error} | {id, event} | {id, end}.
// Bytes in results arrive as lowercase hex strings.
"use strict";

const SESSION_KEY = "clan-console-session";
const REFRESH_EVERY = 5000;
const state = {
  ws: null, nextId: 1, pending: new Map(), streams: new Map(), ready: false,
  session: null, admin: { available: false, reason: "unknown" }, self: null,
  topology: null, services: [], vms: [], secrets: [], selected: null,
  inventoryLeaves: null, inventoryDiffOk: false, refreshTimer: null, retry: 0,
};

// ---------------------------------------------------------------- DOM helpers

const SVG_NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  return fill(node, attrs, children);
}
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  return fill(node, attrs, children);
}
function fill(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const $ = (sel) => document.querySelector(sel);

function toast(text, isError) {
  const t = $("#toast");
  t.textContent = text;
  t.className = isError ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, isError ? 9000 : 4500);
}
function notice(text) {
  const n = $("#notice");
  n.textContent = text || "";
  n.hidden = !text;
}
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}
function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "never";
}
function hexToText(hex) {
  if (typeof hex !== "string" || hex.length % 2) return String(hex);
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
  return new TextDecoder("utf-8", { fatal: false }).decode(bytes);
}
function rttText(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}
function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows));
}

// A button that asks once more before doing something that changes the clan.
// The "armed" state survives a re-render (tables are redrawn as data arrives).
const armedUntil = new Map();
function actionButton(label, attrs, run, disabledWhy) {
  const key = `${attrs["data-action"]}:${attrs["data-secret"] || attrs["data-vm"] || ""}`;
  const b = el("button", { ...attrs, class: "small", title: disabledWhy || null, disabled: !!disabledWhy, text: label });
  const show = () => {
    const armed = (armedUntil.get(key) || 0) > Date.now();
    b.textContent = armed ? `${label}?` : label;
    b.classList.toggle("primary", armed);
  };
  show();
  b.addEventListener("click", async () => {
    if ((armedUntil.get(key) || 0) <= Date.now()) {
      armedUntil.set(key, Date.now() + 4000);
      show();
      setTimeout(() => { if (b.isConnected) show(); }, 4050);
      return;
    }
    armedUntil.delete(key);
    b.disabled = true;
    b.textContent = `${label}…`;
    b.classList.remove("primary");
    try {
      await run();
    } catch (e) {
      toast(e.message, true);
    } finally {
      b.disabled = !!disabledWhy;
      b.textContent = label;
    }
  });
  return b;
}

// ---------------------------------------------------------------- the connection

function connect() {
  state.session = localStorage.getItem(SESSION_KEY);
  if (!state.session) {
    notice("Not logged in. Run 'clanctl ui' on this machine and open the link it prints.");
    setConn(false, "logged out");
    return;
  }
  const ws = new WebSocket(`ws://${location.host}/api`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ auth: state.session }));
  ws.onmessage = (ev) => onMessage(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    state.ready = false;
    setConn(false, "disconnected");
    for (const { reject } of state.pending.values()) reject(new Error("connection lost"));
    state.pending.clear();
    state.streams.clear();
    if (ev.code === 4401 || ev.code === 4403) {
      localStorage.removeItem(SESSION_KEY);
      notice("The session ended (logged out, expired, or the agent restarted). Run 'clanctl ui' for a new link.");
      return;
    }
    if (ev.code === 1009) toast("a message was too large for the console", true);
    const delay = Math.min(10000, 1000 * 2 ** state.retry++);
    setTimeout(connect, delay);
  };
}

function setConn(up, text) {
  const c = $("#conn");
  c.textContent = text;
  c.className = `pill ${up ? "conn-up" : "conn-down"}`;
}

function onMessage(msg) {
  if (msg.id === 0 && msg.ok) {
    state.ready = true;
    state.retry = 0;
    setConn(true, "live");
    notice("");
    start();
    return;
  }
  if ((msg.id === -1 || msg.id === null || msg.id === undefined) && msg.ok === false) {
    // The server could not tell which request this answers (too large or
    // malformed): fail every waiting one, so no button waits forever.
    toast(`${msg.error.code}: ${msg.error.message}`, true);
    for (const p of state.pending.values()) p.reject(new Error(msg.error.message));
    state.pending.clear();
    return;
  }
  const stream = state.streams.get(msg.id);
  if (stream) {
    if ("event" in msg) stream(msg.event);
    else if (msg.end) state.streams.delete(msg.id);
    else if (msg.ok === false) { state.streams.delete(msg.id); toast(msg.error.message, true); }
    return;
  }
  const p = state.pending.get(msg.id);
  if (!p) return;
  state.pending.delete(msg.id);
  if (msg.ok) p.resolve(msg.result);
  else p.reject(Object.assign(new Error(msg.error.message), { code: msg.error.code }));
}

function call(method, params) {
  return new Promise((resolve, reject) => {
    if (!state.ready) { reject(new Error("not connected")); return; }
    const id = state.nextId++;
    state.pending.set(id, { resolve, reject });
    state.ws.send(JSON.stringify({ id, method, params: params || {} }));
  });
}

function stream(method, params, onEvent) {
  const id = state.nextId++;
  state.streams.set(id, onEvent);
  state.ws.send(JSON.stringify({ id, method, params: params || {} }));
  return id;
}

async function login(token) {
  history.replaceState(null, "", "/");  // the token is single use: keep it out of history
  let reply;
  try {
    const r = await fetch("/session", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }), credentials: "omit",
    });
    reply = { ok: r.ok, body: await r.json() };
  } catch (e) {
    reply = { ok: false, body: { error: `the agent did not answer: ${e.message}` } };
  }
  if (!reply.ok) {
    notice(reply.body.error || "login failed");
    return false;
  }
  localStorage.setItem(SESSION_KEY, reply.body.session);
  return true;
}

// ---------------------------------------------------------------- data

async function start() {
  try {
    const s = await call("console.session");
    state.admin = s.admin_key;
    state.self = s.node;
    $("#clan-name").textContent = s.clan ? `${s.clan.name} — ${s.node}` : s.node;
    const k = $("#admin-key");
    k.textContent = s.admin_key.available ? "admin key: here" : "admin key: not here";
    k.className = `pill ${s.admin_key.available ? "key-ok" : "key-no"}`;
    k.title = s.admin_key.available ? "this console can sign VM orders and inventory edits" : s.admin_key.reason;
  } catch (e) {
    toast(e.message, true);
  }
  stream("events", {}, onEvent);
  await refresh();
  clearInterval(state.refreshTimer);
  state.refreshTimer = setInterval(refresh, REFRESH_EVERY);
}

let refreshing = null;
let refreshAgain = false;
async function refresh() {
  if (!state.ready) return;
  if (refreshing) { refreshAgain = true; return refreshing; }
  refreshing = (async () => {
    try {
      const [topo, services, vms, secrets] = await Promise.all([
        call("topology"), call("services"), call("vm.list"), call("secrets.list"),
      ]);
      const shown = JSON.stringify([topo, services, vms, secrets, state.admin]);
      if (shown !== state.shown) {  // re-draw only what changed (keeps hover and focus)
        state.shown = shown;
        Object.assign(state, { topology: topo, services, vms, secrets });
        render();
      }
    } catch (e) {
      if (state.ready) toast(`refresh failed: ${e.message}`, true);
    }
  })();
  await refreshing;
  refreshing = null;
  if (refreshAgain) { refreshAgain = false; refresh(); }
}

let eventTimer = null;
function onEvent(ev) {
  const list = $("#events");
  const t = new Date((ev.ts || Date.now() / 1000) * 1000).toLocaleTimeString();
  const fields = Object.entries(ev).filter(([k]) => k !== "ts" && k !== "type")
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  list.prepend(el("li", {}, el("span", { class: "t", text: t }), el("span", { class: "ty", text: ev.type }), fields));
  while (list.children.length > 300) list.lastChild.remove();
  clearTimeout(eventTimer);
  eventTimer = setTimeout(refresh, 250);  // a burst of events: one refresh
}

// ---------------------------------------------------------------- rendering

function render() {
  renderMap();
  renderDetail();
  renderMachines();
  renderServices();
  renderVms();
  renderSecrets();
}

function layout(names) {
  const cx = 500, cy = 330, n = names.length;
  const r = n <= 1 ? 0 : Math.min(240, 110 + 28 * n);
  const pos = {};
  names.forEach((name, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, n);
    pos[name] = { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a), up: Math.sin(a) < -0.3 };
  });
  return pos;
}

// A state may carry a note ("stopped (by an admin)"): its first word classifies it.
const stateWord = (s) => String(s || "unknown").split(" ")[0];
function vmClass(s) {
  return { running: "vm-running", stopped: "vm-stopped", failed: "vm-failed" }[stateWord(s)] || "vm-other";
}

function renderMap() {
  const topo = state.topology;
  const map = $("#map");
  map.replaceChildren();
  if (!topo || !topo.machines.length) {
    map.append(svg("text", { x: 500, y: 320, "text-anchor": "middle", fill: "#8b98a5", text: "no inventory yet" }));
    return;
  }
  const pos = layout(topo.machines.map((m) => m.name));
  const links = svg("g", { class: "links" });
  for (const l of topo.links) {
    const a = pos[l.a], b = pos[l.b];
    if (!a || !b) continue;
    const title = Object.entries(l.seen_by)
      .map(([m, v]) => `${m} sees ${v.kind}${v.rtt_ms != null ? ` ${rttText(v.rtt_ms)}` : ""}`).join("; ");
    links.append(svg("line", {
      class: `link ${l.kind}`, x1: a.x, y1: a.y, x2: b.x, y2: b.y,
      "data-a": l.a, "data-b": l.b, "data-kind": l.kind,
    }, svg("title", { text: `${l.a} — ${l.b}: ${l.kind}. ${title}` })));
    const label = l.kind === "down" ? "down" : `${l.kind}${l.rtt_ms != null ? " · " + rttText(l.rtt_ms) : ""}`;
    links.append(svg("text", { class: "rtt", x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 6, text: label }));
  }
  map.append(links);
  for (const m of topo.machines) {
    const p = pos[m.name];
    const cls = ["node", m.online ? "online" : "offline", m.self ? "self" : "", state.selected === m.name ? "selected" : ""];
    const g = svg("g", {
      class: cls.join(" ").trim(), id: `node-${m.name}`, "data-machine": m.name,
      transform: `translate(${p.x},${p.y})`, tabindex: 0, role: "button",
      onclick: () => select(m.name),
      onkeydown: (e) => { if (e.key === "Enter") select(m.name); },
    });
    g.append(svg("circle", { class: "body", r: 34 }));
    g.append(svg("text", { class: "name", y: 5, text: m.name }));
    g.append(svg("text", { class: "sub", y: 52, text: m.self ? "this machine" : (m.online ? "online" : m.state) }));
    // services and VMs, grouped under (or above) the machine
    const lines = [
      ...m.services.map((s) => ({ kind: "svc", text: s })),
      ...m.vms.map((v) => ({ kind: "vm", text: v.vm, state: v.state })),
    ];
    if (lines.length) {
      const h = 8 + 16 * lines.length, w = 150;
      const y0 = p.up ? -44 - h : 60;
      const box = svg("g", { class: "group", transform: `translate(${-w / 2},${y0})` });
      box.append(svg("rect", { width: w, height: h }));
      lines.forEach((ln, i) => {
        const y = 17 + 16 * i;
        box.append(svg("text", { class: "kind", x: 8, y, text: ln.kind }));
        if (ln.kind === "vm") box.append(svg("circle", { class: vmClass(ln.state), cx: 38, cy: y - 4, r: 4 }));
        box.append(svg("text", { x: 48, y, text: ln.kind === "vm" ? `${ln.text} (${ln.state})` : ln.text }));
      });
      g.append(box);
    }
    map.append(g);
  }
}

function select(name) {
  state.selected = name;
  renderMap();
  renderDetail();
}

function vmButtons(vm) {
  const why = state.admin.available ? null : `needs the admin key: ${state.admin.reason}`;
  const act = (action) => async () => {
    const r = await call("console.vm", { name: vm, action });
    toast(`${action} ${r.vm}: sent to ${r.hosts.join(", ") || "no machine"}`);
    refresh();
  };
  return [
    actionButton("start", { "data-action": "vm-start", "data-vm": vm }, act("start"), why),
    actionButton("stop", { "data-action": "vm-stop", "data-vm": vm }, act("stop"), why),
    actionButton("restart", { "data-action": "vm-restart", "data-vm": vm }, act("restart"), why),
    el("button", { class: "small", "data-action": "vm-logs", "data-vm": vm, text: "logs", onclick: () => showLogs(vm) }),
  ];
}

function renderDetail() {
  const d = $("#detail");
  const topo = state.topology;
  const m = topo && topo.machines.find((x) => x.name === state.selected);
  if (!m) return;
  d.replaceChildren();
  d.setAttribute("data-machine", m.name);
  d.append(el("h2", { text: m.name }));
  d.append(el("div", { class: `state-${m.self ? "self" : m.online ? "online" : stateWord(m.state)}`,
    text: m.self ? "online (this machine)" : m.online ? "online" : m.state }));
  d.append(el("div", { class: "muted mono", text: `node ${m.node_id.slice(0, 16)}` }));
  d.append(el("h3", { text: "Tags" }), el("div", {}, m.tags.length ? m.tags.map((t) => el("span", { class: "tag", text: t })) : el("span", { class: "muted", text: "none" })));
  d.append(el("h3", { text: "Capabilities" }));
  if (!m.capabilities) d.append(el("div", { class: "muted", text: "not reported yet" }));
  else d.append(el("ul", {}, m.capabilities.map((c) => el("li", { class: c.available ? "" : "cap-no", title: c.reason, text: `${c.name}${c.available ? "" : " (unavailable)"}` }))));
  d.append(el("h3", { text: "Services" }));
  d.append(m.services.length ? el("ul", {}, m.services.map((s) => el("li", { class: "mono", text: s }))) : el("div", { class: "muted", text: "none" }));
  d.append(el("h3", { text: "VMs" }));
  if (!m.vms.length) d.append(el("div", { class: "muted", text: "none" }));
  for (const v of m.vms) {
    d.append(el("div", { class: "vm-row" },
      el("span", { class: "mono", text: v.vm }), " ",
      el("span", { class: `state-${stateWord(v.state)}`, "data-vm-state": v.vm, text: v.state }), " ",
      el("div", {}, vmButtons(v.vm))));
  }
  d.append(el("h3", { text: "Links" }));
  const mine = topo.links.filter((l) => l.a === m.name || l.b === m.name);
  d.append(mine.length ? el("ul", {}, mine.map((l) => {
    const other = l.a === m.name ? l.b : l.a;
    return el("li", {}, `${other}: `, el("span", { class: `state-${l.kind === "down" ? "down" : "ok"}`, text: l.kind }), l.rtt_ms != null ? ` ${rttText(l.rtt_ms)}` : "");
  })) : el("div", { class: "muted", text: "none" }));
}

function renderMachines() {
  const topo = state.topology;
  if (!topo) return;
  const rows = topo.machines.map((m) => el("tr", { "data-machine": m.name },
    el("td", { class: "mono", text: m.name }),
    el("td", { class: "mono muted", text: m.node_id.slice(0, 10) }),
    el("td", {}, m.tags.map((t) => el("span", { class: "tag", text: t }))),
    el("td", { class: `state-${m.self ? "self" : m.online ? "online" : stateWord(m.state)}`, text: m.self ? "online (this machine)" : m.online ? "online" : m.state }),
    el("td", {}, (m.capabilities || []).map((c) => el("span", { class: `tag ${c.available ? "" : "cap-no"}`, title: c.reason, text: c.name }))),
    el("td", { class: "mono", text: m.services.join(", ") || "-" }),
    el("td", { class: "mono", text: m.vms.map((v) => `${v.vm} (${v.state})`).join(", ") || "-" }),
    el("td", { class: "actions" }, m.self ? null : el("button", {
      class: "small", "data-action": "remove", "data-machine": m.name, text: "remove…",
      onclick: () => openRemove(m.name),
    }))));
  $("#machines-table").replaceChildren(table(["Name", "Node", "Tags", "State", "Capabilities", "Services", "VMs", ""], rows));
}

function renderServices() {
  const box = $("#services-list");
  if (!state.services.length) { box.replaceChildren(el("p", { class: "muted", text: "no services in the inventory" })); return; }
  box.replaceChildren(...state.services.map((svc) => {
    const rows = svc.roles.map((role) => el("tr", {},
      el("td", { class: "mono", text: role.role }),
      el("td", { text: role.machines.join(", ") || "-" }),
      el("td", { class: "mono", text: role.exports.join(", ") || "-" }),
      el("td", { class: "mono", text: role.imports.join(", ") || "-" }),
      el("td", { class: "mono", text: role.imported_by.join(", ") || "-" }),
      el("td", { class: "wire" }, (role.exports.length ? role.published || [] : []).map((p) =>
        el("div", {}, `${p.machine}: `, p.published
          ? Object.entries(p.values).map(([k, v]) => `${k}=${v}`).join("  ")
          : el("span", { class: "muted", text: "(not yet)" }))))));
    return el("div", { class: "service", "data-service": svc.service },
      el("h3", {}, svc.service, el("span", { class: "muted", text: `  type ${svc.type}` })),
      table(["Role", "Machines", "Exports", "Imports", "Imported by", "Published"], rows));
  }));
}

function renderVms() {
  const rows = state.vms.map((v) => el("tr", { "data-vm": v.vm },
    el("td", { class: "mono", text: v.vm }),
    el("td", { text: v.machine }),
    el("td", { class: `state-${stateWord(v.state)}`, text: v.state }),
    el("td", { text: v.accel || "-" }),
    el("td", { text: v.crashes || 0 }),
    el("td", { class: "muted", text: v.reason || "-" }),
    el("td", { class: "actions" }, vmButtons(v.vm))));
  $("#vms-table").replaceChildren(rows.length ? table(["VM", "Machine", "State", "Accel", "Crashes", "Detail", ""], rows)
    : el("p", { class: "muted", text: "no VMs declared in the inventory" }));
}

async function showLogs(vm) {
  const out = $("#vm-logs");
  $("#vm-logs-title").hidden = false;
  $("#vm-logs-title").textContent = `Console of ${vm}`;
  out.hidden = false;
  out.textContent = "asking the machine that hosts it…";
  document.querySelector('nav button[data-tab="vms"]').click();
  const since = Math.floor(Date.now() / 1000);
  const deadline = Date.now() + 15000;
  try {
    for (;;) {
      const r = await call("vm.logs", { name: vm, since });
      if (!r.pending) { out.textContent = hexToText(r.tail) || "(empty)"; out.scrollTop = out.scrollHeight; return; }
      if (Date.now() > deadline) { out.textContent = `no answer from the machine hosting ${vm} in 15 s (is it online?)`; return; }
      await new Promise((res) => setTimeout(res, 400));
    }
  } catch (e) {
    out.textContent = e.message;
  }
}

function renderSecrets() {
  const rows = state.secrets.map((s) => {
    const st = s.error ? "error" : s.pending ? "pending" : "ok";
    return el("tr", { "data-secret": s.id },
      el("td", { class: "mono", text: s.id }),
      el("td", { "data-generation": s.id, text: s.generation || "-" }),
      el("td", { text: ago(s.age_s) }),
      el("td", { text: when(s.next_rotation) }),
      el("td", { text: s.holders.join(", ") }),
      el("td", { class: `state-${st}`, title: s.error || "", text: s.error ? "generator failed" : s.pending ? `pending: ${s.pending}` : "ok" }),
      el("td", { class: "actions" }, actionButton("rotate", { "data-action": "rotate", "data-secret": s.id }, async () => {
        const r = await call("secrets.rotate", { id: s.id });
        toast(`rotation of ${r.id} requested (after generation ${r.generation})`);
        refresh();
      })));
  });
  $("#secrets-table").replaceChildren(rows.length ? table(["Secret", "Gen", "Age", "Next rotation", "Holders", "State", ""], rows)
    : el("p", { class: "muted", text: "no secrets declared in the inventory" }));
}

// ---------------------------------------------------------------- inventory editor

async function loadInventory() {
  try {
    const r = await call("console.inventory_text");
    $("#inv-text").value = r.toml;
    state.inventoryLeaves = null;
    state.inventoryDiffOk = false;
    updateApply();
    $("#inv-state").textContent = `${r.versions} version(s)${r.conflicts ? `, ${r.conflicts} conflict(s)` : ""}`;
    $("#inv-diff-out").textContent = 'Press "Show diff" to compare your edit with the clan\'s inventory.';
  } catch (e) {
    toast(e.message, true);
  }
}

async function showDiff() {
  const out = $("#inv-diff-out");
  try {
    const r = await call("console.inventory_diff", { text: $("#inv-text").value });
    const parts = [];
    for (const e of r.errors) parts.push(`error: ${e}`);
    for (const w of r.warnings) parts.push(`warning: ${w}`);
    if (!r.errors.length) parts.push(r.diff || "no changes");
    out.textContent = parts.join("\n");
    state.inventoryLeaves = r.leaves;
    state.inventoryDiffOk = !r.errors.length && r.changes.length > 0;
  } catch (e) {
    out.textContent = e.message;
    state.inventoryDiffOk = false;
  }
  updateApply();
}

function updateApply() {
  const b = $("#inv-apply");
  b.disabled = !(state.inventoryDiffOk && state.admin.available);
  b.title = !state.admin.available ? `needs the admin key: ${state.admin.reason}`
    : !state.inventoryDiffOk ? "show a diff with changes and no errors first" : "sign with the admin key and submit";
}

async function applyInventory() {
  try {
    const r = await call("console.inventory_apply", {
      text: $("#inv-text").value, leaves: state.inventoryLeaves, message: $("#inv-message").value,
    });
    toast(`applied version ${r.hash.slice(0, 12)} (${r.status})`);
    $("#inv-message").value = "";
    await loadInventory();
    refresh();
  } catch (e) {
    toast(e.message, true);
  }
}

// ---------------------------------------------------------------- guided edits
// Add a machine, remove one, apply a service to tags.  Every keystroke asks the
// agent for a preview (the same selection code the agents run); "Sign" sends the
// form again with the head and the digest of the change that was shown, and the
// agent refuses if either moved.

const guided = { add: null, remove: null, svc: null, waitTimer: null };

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}
function splitNames(text) {
  return text.split(/[\s,]+/).map((x) => x.trim()).filter(Boolean);
}
function showFieldErrors(root, errors) {
  for (const span of root.querySelectorAll(".field-error[data-field]")) {
    const msg = (errors || {})[span.dataset.field];
    span.textContent = msg || "";
    span.hidden = !msg;
  }
}
function showError(id, text, rediffId) {
  const p = $(id);
  p.textContent = text || "";
  p.hidden = !text;
  if (rediffId) $(rediffId).hidden = !(text && /changed since|not the change the preview showed/.test(text));
}
function signable(preview) {
  return preview && !Object.keys(preview.errors || {}).length && preview.changes.length > 0 && state.admin.available;
}
function signTitle(preview) {
  if (!state.admin.available) return `needs the admin key: ${state.admin.reason}`;
  if (!preview || Object.keys(preview.errors || {}).length) return "fix what the form says first";
  return "sign the change shown above with the admin key";
}

// -- add a machine

function addForm() {
  return { name: $("#am-name").value.trim(), tags: splitNames($("#am-tags").value), key: $("#am-key").value.trim() };
}

async function addPreview() {
  const form = addForm();
  const root = $("#add-machine");
  const seq = (guided.addSeq = (guided.addSeq || 0) + 1);
  try {
    const r = await call("console.machine_add_preview", form);
    // requests run concurrently: show only the answer to the latest form
    if (seq !== guided.addSeq || JSON.stringify(addForm()) !== JSON.stringify(form)) return;
    guided.add = { ...r, form };
    $("#am-tags-known").replaceChildren(...r.tags_known.map((t) => el("button", {
      class: "chip small", "data-tag": t, text: t, title: `add tag ${t}`,
      onclick: () => {
        const tags = splitNames($("#am-tags").value);
        if (!tags.includes(t)) $("#am-tags").value = [...tags, t].join(", ");
        addPreview();
      },
    })));
    // untouched fields are not wrong yet: say so only once something was typed
    const errors = Object.fromEntries(Object.entries(r.errors).filter(([k]) => (k === "tags" ? form.tags.length : form[k])));
    showFieldErrors(root, errors);
    $("#am-diff").textContent = Object.keys(r.errors).length ? "The change appears once the form is right." : r.diff;
    $("#am-gets").textContent = r.gets
      ? `${form.name} will hold: ${r.gets.roles.join(", ") || "no roles"}; VMs: ${r.gets.vms.join(", ") || "none"}; secrets: ${r.gets.secrets.join(", ") || "none"}; imports: ${r.gets.imports.join(", ") || "none"}`
      : "";
    showError("#am-error", "", "#am-rediff");
  } catch (e) {
    guided.add = null;
    showError("#am-error", e.message);
  }
  const b = $("#am-sign");
  b.disabled = !signable(guided.add);
  b.title = signTitle(guided.add);
}

async function addSign() {
  const p = guided.add;
  if (!signable(p)) return;
  $("#am-sign").disabled = true;
  try {
    const r = await call("console.machine_add", { ...p.form, leaves: p.leaves, digest: p.digest });
    $("#am-result-name").textContent = r.machine;
    $("#am-command").textContent = r.command;
    $("#am-qr").src = r.qr;
    $("#am-result").hidden = false;
    $("#am-result").dataset.token = r.token;
    toast(`added ${r.machine} (version ${r.hash.slice(0, 12)})`);
    for (const id of ["#am-name", "#am-tags", "#am-key"]) $(id).value = "";
    guided.add = null;
    $("#am-diff").textContent = "Signed.";
    waitForJoin(r.machine);
    refresh();
  } catch (e) {
    showError("#am-error", e.message, "#am-rediff");
    $("#am-sign").disabled = !$("#am-rediff").hidden || !signable(guided.add);
  }
}

function linkTo(topo, name) {
  return topo.links.find((l) => (l.a === name && l.b === topo.self) || (l.b === name && l.a === topo.self));
}

function waitForJoin(name) {
  clearTimeout(guided.waitTimer);
  const out = $("#am-wait");
  out.className = "wait waiting";
  out.textContent = `waiting for ${name} to join…`;
  delete out.dataset.joined;
  delete out.dataset.rtt;
  let deadline = Infinity;
  const tick = async () => {
    try {
      const topo = await call("topology");
      const m = topo.machines.find((x) => x.name === name);
      const link = m && m.online ? linkTo(topo, name) : null;
      if (link && link.kind !== "down") {
        if (deadline === Infinity) deadline = Date.now() + 20000;
        const seen = (link.seen_by || {})[topo.self] || Object.values(link.seen_by || {})[0] || {};
        const kind = (seen.kind || link.kind).toUpperCase() === "LAN" ? "LAN" : (seen.kind || link.kind);
        const rtt = seen.rtt_ms != null ? `, ${rttText(seen.rtt_ms)}` : "";
        out.className = "wait joined";
        if (!out.dataset.joined) refresh();
        out.dataset.joined = name;
        // the RTT comes with the first probe round: keep asking a little while for it
        out.textContent = `${name} joined, path: ${kind}${rtt || " (measuring the RTT…)"}`;
        if (rtt || Date.now() > deadline) { out.dataset.rtt = rtt ? String(seen.rtt_ms) : ""; return; }
      }
      if (!m) { out.textContent = `${name} is not in the inventory any more`; return; }
    } catch (e) { /* connection blips: keep waiting */ }
    guided.waitTimer = setTimeout(tick, 1000);
  };
  tick();
}

async function copyCommand() {
  const text = $("#am-command").textContent;
  try {
    await navigator.clipboard.writeText(text);
    toast("command copied");
  } catch (e) {
    // no clipboard permission (plain http): select it for Ctrl+C instead
    const range = document.createRange();
    range.selectNodeContents($("#am-command"));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    toast("selected: press Ctrl+C to copy");
  }
}

// -- remove a machine

async function openRemove(name) {
  const panel = $("#remove-panel");
  panel.hidden = false;
  $("#rm-name").textContent = name;
  $("#rm-consequences").replaceChildren(el("li", { class: "muted", text: "working out what follows…" }));
  $("#rm-diff").textContent = "";
  $("#rm-sign").disabled = true;
  $("#rm-state").textContent = "";
  showError("#rm-error", "");
  try {
    const r = await call("console.machine_remove_preview", { name });
    guided.remove = { ...r, name };
    const err = Object.values(r.errors)[0];
    showError("#rm-error", err || "");
    $("#rm-consequences").replaceChildren(...r.consequences.map((c) => el("li", { "data-kind": c.kind, text: c.text })));
    $("#rm-diff").textContent = r.diff;
    $("#rm-sign").disabled = !signable(r);
    $("#rm-sign").title = signTitle(r);
    $("#rm-sign").textContent = `Sign and remove ${name}`;
  } catch (e) {
    showError("#rm-error", e.message);
  }
  panel.scrollIntoView({ block: "nearest" });
}

async function removeSign() {
  const p = guided.remove;
  if (!signable(p)) return;
  $("#rm-sign").disabled = true;
  try {
    await call("console.machine_remove", { name: p.name, leaves: p.leaves, digest: p.digest });
    toast(`removed ${p.name}`);
    $("#rm-state").textContent = `removed ${p.name}; waiting for it to leave the map…`;
    guided.remove = null;
    const tick = async () => {
      const topo = await call("topology").catch(() => null);
      if (topo && !topo.machines.some((m) => m.name === p.name)) {
        $("#rm-state").textContent = `${p.name} left the clan`;
        if ($("#am-result-name").textContent === p.name) { clearTimeout(guided.waitTimer); $("#am-result").hidden = true; }
        $("#rm-state").dataset.left = p.name;
        refresh();
        return;
      }
      setTimeout(tick, 1000);
    };
    tick();
  } catch (e) {
    const moved = /changed since|not the change the preview showed/.test(e.message);
    showError("#rm-error", moved ? `${e.message} (the preview above is refreshed)` : e.message);
    if (moved) openRemove(p.name);
  }
}

// -- apply a service to tags

function svcForm() {
  const sel = $("#as-service").value;
  const isNew = sel === "__new__";
  const roles = {};
  for (const tr of document.querySelectorAll("#as-roles tbody tr")) {
    const name = tr.dataset.role || tr.querySelector("input.role-name").value.trim();
    if (!name) continue;
    roles[name] = {
      tags: splitNames(tr.querySelector("input.role-tags").value),
      machines: splitNames(tr.querySelector("input.role-machines").value),
    };
  }
  return {
    service: isNew ? $("#as-new-name").value.trim() : sel,
    type: isNew ? $("#as-type").value.trim() : null,
    roles,
  };
}

function roleRow(name, sel, isNew) {
  const input = (cls, value, ph) => el("input", { class: cls, value: value || "", placeholder: ph, spellcheck: "false", oninput: debouncedSvc });
  return el("tr", { "data-role": isNew ? null : name },
    el("td", { class: "mono" }, isNew ? input("role-name", name, "role name") : name),
    el("td", {}, input("role-tags", (sel.tags || []).join(", "), "tags"), el("span", { class: "field-error", "data-field": `roles.${name}.tags` })),
    el("td", {}, input("role-machines", (sel.machines || []).join(", "), "machine names"), el("span", { class: "field-error", "data-field": `roles.${name}.machines` })),
    el("td", { class: "lands mono", "data-lands": name, text: "-" }));
}

function svcPick() {
  const sel = $("#as-service").value;
  const isNew = sel === "__new__";
  $("#as-new-name").hidden = !isNew;
  $("#as-type-label").hidden = !isNew;
  $("#as-type-row").hidden = !isNew;
  const known = (guided.svc && guided.svc.services) || {};
  const body = $("#as-roles tbody");
  if (isNew) body.replaceChildren(roleRow("", {}, true));
  else body.replaceChildren(...Object.entries((known[sel] || {}).roles || {}).map(([r, x]) => roleRow(r, x, false)));
  servicePreview();
}

async function servicePreview() {
  const form = svcForm();
  const root = $("#apply-service");
  const seq = (guided.svcSeq = (guided.svcSeq || 0) + 1);
  let r;
  try {
    r = await call("console.service_preview", form);
  } catch (e) {
    showError("#as-error", e.message);
    return;
  }
  // requests run concurrently: show only the answer to the latest form
  if (seq !== guided.svcSeq) return;
  if ($("#as-service").options.length && JSON.stringify(svcForm()) !== JSON.stringify(form)) return;
  guided.svc = { ...r, form };
  const select = $("#as-service");
  if (!select.options.length) {
    select.replaceChildren(...Object.keys(r.services).map((s) => el("option", { value: s, text: `${s} (${r.services[s].type})` })),
      el("option", { value: "__new__", text: "a new service…" }));
    svcPick();
    return;
  }
  $("#as-known").textContent = `tags in use: ${r.tags_known.join(", ") || "none"}; machines: ${r.machines_known.join(", ")}`;
  // a new row's role has no name yet: its errors are keyed by the name typed
  for (const tr of document.querySelectorAll("#as-roles tbody tr")) {
    const name = tr.dataset.role || tr.querySelector("input.role-name").value.trim();
    tr.querySelector(".role-tags + .field-error").dataset.field = `roles.${name}.tags`;
    tr.querySelector(".role-machines + .field-error").dataset.field = `roles.${name}.machines`;
    const lands = tr.querySelector("td.lands");
    lands.dataset.lands = name;
    const role = r.preview && r.preview.roles.find((x) => x.role === name);
    lands.textContent = role ? `${role.machines.join(", ") || "no machine"}${JSON.stringify(role.before) !== JSON.stringify(role.machines) ? `  (was: ${role.before.join(", ") || "none"})` : ""}` : "-";
  }
  showFieldErrors(root, r.errors);
  const p = r.preview;
  $("#as-secrets").replaceChildren(p && p.secrets.length ? table(["Secret", "For", "Made by", "Change"], p.secrets.map((x) =>
    el("tr", { "data-secret": x.id }, el("td", { class: "mono", text: x.id }), el("td", { text: x.holders.join(", ") || "-" }),
      el("td", { text: x.generator || (x.holders.length ? "the first holder online" : "-") }), el("td", { text: x.change }))))
    : el("span", { text: p ? "this service declares no secrets" : "-" }));
  $("#as-wiring").replaceChildren(p && p.wiring.length ? table(["Import", "By", "From", "To", "Values"], p.wiring.map((w) =>
    el("tr", {}, el("td", { class: "mono", text: w.import }), el("td", { class: "mono", text: w.by }),
      el("td", { text: w.from.join(", ") || "no machine" }), el("td", { text: w.to.join(", ") || "-" }), el("td", { class: "mono", text: w.values.join(", ") || "-" }))))
    : el("span", { text: p ? "no imports" : "-" }));
  $("#as-diff").textContent = Object.keys(r.errors).length ? "The change appears once the form is right." : (r.diff || "no changes");
  showError("#as-error", "", "#as-rediff");
  $("#as-sign").disabled = !signable(r);
  $("#as-sign").title = signTitle(r);
}
const debouncedSvc = debounce(servicePreview, 200);

async function serviceSign() {
  const p = guided.svc;
  if (!signable(p)) return;
  $("#as-sign").disabled = true;
  try {
    const r = await call("console.service_apply", { ...p.form, leaves: p.leaves, digest: p.digest });
    toast(`applied ${p.form.service} (version ${r.hash.slice(0, 12)})`);
    $("#as-state").textContent = `applied ${p.form.service}`;
    $("#as-service").replaceChildren();  // re-read the services, then the form
    await servicePreview();
    refresh();
  } catch (e) {
    showError("#as-error", e.message, "#as-rediff");
    // a head that moved: nothing to sign until the preview is made again
    $("#as-sign").disabled = !$("#as-rediff").hidden || !signable(guided.svc);
  }
}

function setupGuided() {
  const addLater = debounce(addPreview, 200);
  for (const id of ["#am-name", "#am-tags", "#am-key"]) $(id).addEventListener("input", addLater);
  $("#am-sign").addEventListener("click", addSign);
  $("#am-rediff").addEventListener("click", addPreview);
  $("#am-copy").addEventListener("click", copyCommand);
  $("#rm-sign").addEventListener("click", removeSign);
  $("#rm-cancel").addEventListener("click", () => { $("#remove-panel").hidden = true; guided.remove = null; });
  $("#as-service").addEventListener("change", svcPick);
  for (const id of ["#as-new-name", "#as-type"]) $(id).addEventListener("input", debouncedSvc);
  $("#as-add-role").addEventListener("click", () => { $("#as-roles tbody").append(roleRow("", {}, true)); });
  $("#as-sign").addEventListener("click", serviceSign);
  $("#as-rediff").addEventListener("click", servicePreview);
}

// ---------------------------------------------------------------- start-up

function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === `tab-${name}`);
  if (name === "inventory" && !$("#inv-text").value && state.ready) loadInventory();
  if (name === "machines" && state.ready) addPreview();
  if (name === "services" && state.ready) servicePreview();
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#inv-reload").addEventListener("click", loadInventory);
  $("#inv-diff").addEventListener("click", showDiff);
  $("#inv-apply").addEventListener("click", applyInventory);
  $("#inv-text").addEventListener("input", () => { state.inventoryDiffOk = false; updateApply(); });
  setupGuided();
  $("#logout").addEventListener("click", async () => {
    const session = localStorage.getItem(SESSION_KEY);
    localStorage.removeItem(SESSION_KEY);
    await fetch("/logout", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ session }) }).catch(() => {});
    if (state.ws) state.ws.close();
    notice("Logged out. Run 'clanctl ui' for a new link.");
  });
  const params = new URLSearchParams(location.search);
  if (location.pathname === "/login" && params.get("token")) {
    if (!(await login(params.get("token")))) return;
  }
  connect();
});
