// fedtune dashboard: polls /api/run every two seconds and redraws. Plain DOM and uPlot, no build step.
// Run data (client ids, reasons) only ever reaches the page as textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "fedtune-dashboard-token";
const COLORS = ["#2f6fdf", "#e07b22", "#1f8a4c", "#c8372d", "#7a4fc4", "#5f6b7a"];
const MIB = 1024 * 1024;

let token = sessionStorage.getItem(TOKEN_KEY);
let last = null; // the latest summary, redrawn on resize
const charts = {};

const $ = (id) => document.getElementById(id);

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 ? v.toFixed(0) : v.toPrecision(digits);
}

function loss(v) {
  return v === null || v === undefined ? "–" : v.toFixed(3);
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString();
}

function show(id, visible) {
  $(id).hidden = !visible;
}

function facts(id, pairs) {
  const dl = $(id);
  dl.replaceChildren();
  for (const [name, value] of pairs) {
    if (value === null || value === undefined) continue;
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    div.append(dt, dd);
    dl.append(div);
  }
}

// A table from a header and rows of cells; a cell is a value or {text, num}; rowClass(row) may name a class.
function table(id, caption, header, rows, rowClass) {
  const t = $(id);
  t.replaceChildren();
  t.hidden = rows.length === 0;
  if (rows.length === 0) return;
  if (caption) t.createCaption().textContent = caption;
  const head = t.createTHead().insertRow();
  for (const h of header) {
    const th = document.createElement("th");
    th.textContent = h.text ?? h;
    if (h.num) th.className = "num";
    head.append(th);
  }
  const body = t.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    if (rowClass) tr.className = rowClass(row) || "";
    row.cells.forEach((cell, i) => {
      const td = tr.insertCell();
      td.textContent = cell === null || cell === undefined ? "–" : String(cell);
      if (header[i].num) td.className = "num";
    });
  }
}

// One chart per panel: created once, then given new data; re-created when its series change.
function chart(id, summary, series, axes = {}) {
  const el = $("chart-" + id);
  const width = Math.max(el.clientWidth, 260);
  const x = summary.rounds.map((r) => r.round_num);
  const data = [x, ...series.map((s) => s.values)];
  const key = series.map((s) => s.label).join("|");
  const total = summary.progress.rounds_total;
  const existing = charts[id];
  if (existing && existing.key === key && existing.total === total) {
    existing.plot.setData(data);
    if (existing.width !== width) {
      existing.plot.setSize({ width, height: 220 });
      existing.width = width;
    }
    return;
  }
  if (existing) existing.plot.destroy();
  const scales = {
    x: { time: false, range: (u, min, max) => [0, Math.max(total || 1, max || 1)] },
    y: { range: axes.yRange },
  };
  const uaxes = [
    { label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], size: 40 },
    { scale: "y", label: axes.y || "", size: 60 },
  ];
  if (axes.y2) {
    scales.y2 = { range: axes.y2Range };
    uaxes.push({ scale: "y2", side: 1, label: axes.y2, grid: { show: false }, size: 60 });
  }
  const opts = {
    width,
    height: 220,
    scales,
    axes: uaxes,
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
    series: [
      { label: "round" },
      ...series.map((s, i) => ({
        label: s.label,
        scale: s.scale || "y",
        stroke: s.color || COLORS[i % COLORS.length],
        width: 2,
        dash: s.dash,
        spanGaps: true,
        points: { show: s.points !== false, size: 6 },
        value: (u, v) => fmt(v),
      })),
    ],
  };
  charts[id] = { key, total, width, plot: new uPlot(opts, data, el) };
}

const col = (summary, f) => summary.rounds.map((r) => {
  const v = f(r);
  return v === undefined ? null : v;
});

function renderProgress(s) {
  const p = s.progress;
  const settings = s.settings;
  const name = settings ? settings.name : s.run_dir;
  $("title").textContent = `fedtune: ${name}`;
  document.title = `${name} · fedtune dashboard`;
  const badge = $("badge");
  badge.textContent = p.state;
  badge.className = `badge ${p.state}`;
  const topology = settings && settings.topology === "decentralized" ? "decentralized " : "";
  $("subtitle").textContent = `${topology}${s.kind} · ${s.run_dir}`;
  const done = p.rounds_total ? Math.min(p.rounds_done / p.rounds_total, 1) : 0;
  $("bar-fill").style.width = `${(100 * done).toFixed(1)}%`;
  facts("progress-facts", [
    ["rounds", p.rounds_total ? `${p.rounds_done} of ${p.rounds_total}` : String(p.rounds_done)],
    ["failed rounds", p.failed_rounds ? String(p.failed_rounds) : null],
    ["time per round", duration(p.seconds_per_round)],
    ["left", p.eta_s === null ? null : `about ${duration(p.eta_s)}`],
    ["last round ended", p.last_update_age_s === null ? null : `${duration(p.last_update_age_s)} ago`],
    ["privacy", settings && settings.privacy_mode !== "off" ? settings.privacy_mode : null],
    ["secure aggregation", settings && settings.secure_aggregation ? "on" : null],
    ["attack", settings && settings.attack !== "none" ? settings.attack : null],
    ["personalize", settings && settings.personalize !== "none" ? settings.personalize : null],
  ]);
  const notes = $("notes");
  notes.replaceChildren(...s.notes.map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    return li;
  }));
}

function renderOpenRound(s) {
  const open = s.deployment && s.deployment.open_round;
  if (!open) return;
  const age = s.generated_at - open.started_at;
  $("open-round-title").textContent =
    `Round ${open.round_num} in flight for ${duration(age)}: ${open.submitted} of ${open.participants.length} submitted`;
  table("table-open-round", null, ["client", "status", "detail"],
    open.participants.map((p) => ({ cells: [p.client_id, p.status, p.detail] })));
}

function renderCharts(s) {
  const has = (panel) => s.panels.includes(panel);
  if (has("loss")) {
    const series = [
      { label: "train loss", values: col(s, (r) => r.train_loss) },
      { label: "eval loss", values: col(s, (r) => r.eval_loss) },
    ];
    if (s.rounds.some((r) => r.eval_loss_std !== null)) {
      series.push({ label: "eval loss spread (std)", values: col(s, (r) => r.eval_loss_std), dash: [4, 4] });
    }
    chart("loss", s, series, { y: "loss" });
  }
  if (has("time")) {
    chart("time", s, [
      { label: "whole round", values: col(s, (r) => r.seconds) },
      { label: "training", values: col(s, (r) => r.train_seconds) },
      { label: "evaluation", values: col(s, (r) => r.eval_seconds) },
    ], { y: "seconds" });
  }
  if (has("participation")) {
    chart("participation", s, [
      { label: "selected", values: col(s, (r) => r.selected) },
      { label: "aggregated", values: col(s, (r) => r.aggregated) },
      { label: "stragglers", values: col(s, (r) => r.stragglers.length) },
      { label: "failures", values: col(s, (r) => Object.keys(r.failures).length) },
    ], { y: "clients", yRange: (u, min, max) => [0, Math.max(max, 1)] });
  }
  if (has("bytes")) {
    chart("bytes", s, [
      { label: "up", values: col(s, (r) => (r.bytes_up === null ? null : r.bytes_up / MIB)) },
      { label: "down", values: col(s, (r) => (r.bytes_down === null ? null : r.bytes_down / MIB)) },
    ], { y: "MiB", yRange: (u, min, max) => [0, Math.max(max, 0.001)] });
  }
  if (has("privacy")) renderPrivacy(s);
  if (has("secagg")) {
    const stages = ["advertise", "share", "masked", "unmask"];
    chart("secagg", s, stages.map((name, i) => ({
      label: name,
      values: col(s, (r) => (r.secagg_survivors && i < r.secagg_survivors.length ? r.secagg_survivors[i] : null)),
    })), { y: "clients", yRange: (u, min, max) => [0, Math.max(max, 1)] });
    const aborts = s.rounds.filter((r) => r.secagg_abort);
    $("secagg-aborts").replaceChildren(...aborts.map((r) => {
      const li = document.createElement("li");
      li.textContent = `round ${r.round_num} aborted: ${r.secagg_abort}`;
      return li;
    }));
  }
  if (has("attack")) {
    const latest = [...s.rounds].reverse().find((r) => r.backdoor_success !== null);
    facts("attack-facts", [
      ["kind", s.settings ? s.settings.attack : null],
      ["backdoor success (latest)", latest ? `${(100 * latest.backdoor_success).toFixed(0)}%` : null],
    ]);
    chart("attack", s, [
      { label: "honest clients' eval loss", values: col(s, (r) => r.honest_eval_loss) },
      { label: "backdoor success", values: col(s, (r) => r.backdoor_success), scale: "y2" },
    ], { y: "loss", y2: "success", y2Range: () => [0, 1] });
  }
  if (has("personal")) {
    const r = [...s.rounds].reverse().find((row) => row.personal_eval_loss !== null);
    facts("personal-facts", [
      ["method", s.settings ? s.settings.personalize : null],
      ["round", String(r.round_num)],
      ["global adapter's eval loss", loss(r.eval_loss)],
      ["personal adapters' eval loss", loss(r.personal_eval_loss)],
    ]);
  }
  if (has("decentral")) {
    chart("decentral", s, [
      { label: "accepted", values: col(s, (r) => r.acceptance_rate) },
    ], { y: "share", yRange: () => [0, 1] });
  }
}

function renderPrivacy(s) {
  const budget = s.settings ? s.settings.target_epsilon : null;
  const spent = [...s.rounds].reverse().find((r) => r.epsilon !== null);
  const series = [{ label: "epsilon spent", values: col(s, (r) => r.epsilon) }];
  if (budget !== null) {
    series.push({ label: "budget", values: s.rounds.map(() => budget), dash: [6, 4], points: false, color: COLORS[3] });
  }
  if (s.rounds.some((r) => r.dpsgd_epsilon !== null)) {
    series.push({ label: "DP-SGD epsilon (largest client)", values: col(s, (r) => r.dpsgd_epsilon) });
  }
  facts("privacy-facts", [
    ["spent", spent ? fmt(spent.epsilon) : null],
    ["budget", budget === null ? null : fmt(budget)],
    ["used", spent && budget ? `${((100 * spent.epsilon) / budget).toFixed(0)}%` : null],
    ["delta", s.settings && s.settings.delta !== null ? s.settings.delta.toExponential(1) : null],
  ]);
  chart("privacy", s, series, { y: "epsilon", yRange: (u, min, max) => [0, Math.max(max, 1e-3)] });
}

function renderTables(s) {
  const has = (panel) => s.panels.includes(panel);
  if (has("clients")) {
    table("table-clients", null,
      ["client", { text: "aggregated", num: true }, { text: "straggled", num: true },
        { text: "refused", num: true }, { text: "last round", num: true }, "last refusal"],
      s.clients.map((c) => ({
        cells: [c.client_id, c.aggregated, c.straggled, c.failed, c.last_round, c.last_failure],
      })));
  }
  if (has("refusals")) {
    table("table-refused-totals", "Refused messages, by kind", ["kind", { text: "count", num: true }],
      Object.entries(s.refused_totals).map(([k, n]) => ({ cells: [k, n] })));
    const latest = s.deployment ? [...s.deployment.latest_refusals].reverse() : [];
    table("table-refusals", "Latest refusals", ["time", "round", "client", "kind", "reason"],
      latest.map((e) => ({ cells: [clock(e.at), e.round_num, e.client_id, e.kind, e.detail] })));
    const failures = [];
    for (const r of [...s.rounds].reverse()) {
      if (r.failed) failures.push({ cells: [r.round_num, "(the round)", r.failed] });
      for (const [cid, why] of Object.entries(r.failures)) failures.push({ cells: [r.round_num, cid, why] });
      if (failures.length >= 30) break;
    }
    table("table-failures", "Refused updates and failed rounds", ["round", "client", "reason"], failures);
  }
  const rows = [...s.rounds].reverse().slice(0, 30).map((r) => ({
    failed: r.failed !== null,
    cells: [
      r.round_num,
      r.failed === null ? "done" : `failed: ${r.failed}`,
      r.selected === null ? fmt(r.aggregated) : `${r.aggregated} / ${r.selected}`,
      r.stragglers.length,
      loss(r.train_loss),
      loss(r.eval_loss),
      r.epsilon === null ? "–" : fmt(r.epsilon, 3),
      r.bytes_up === null ? "–" : (r.bytes_up / MIB).toFixed(2),
      duration(r.seconds),
    ],
  }));
  table("table-rounds", s.rounds.length > 30 ? "The latest 30 rounds" : null,
    [{ text: "round", num: true }, "status", "aggregated", { text: "stragglers", num: true },
      { text: "train loss", num: true }, { text: "eval loss", num: true }, { text: "epsilon", num: true },
      { text: "MiB up", num: true }, { text: "time", num: true }],
    rows, (row) => (row.failed ? "failed" : ""));
  if (rows.length === 0) {
    const t = $("table-rounds");
    t.hidden = false;
    t.createCaption().textContent = "No round has finished yet.";
  }
}

function render(s) {
  last = s;
  show("main", true);
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = !s.panels.includes(section.id.replace("panel-", ""));
  }
  renderProgress(s);
  renderOpenRound(s);
  renderCharts(s);
  renderTables(s);
  const latest = s.rounds.length ? s.rounds[s.rounds.length - 1].round_num : "";
  document.body.dataset.state = s.progress.state;
  document.body.dataset.rounds = String(s.rounds.length);
  document.body.dataset.latestRound = String(latest);
  document.body.dataset.generatedAt = String(s.generated_at);
  $("updated").textContent = `updated ${clock(s.generated_at)}`;
}

function askToken(refused) {
  show("main", false);
  show("token-form", true);
  show("token-error", refused);
  document.body.dataset.state = "token";
  $("token").focus();
}

async function poll() {
  let again = true;
  try {
    const headers = token ? { "X-Fedtune-Token": token } : {};
    const response = await fetch("/api/run", { headers, cache: "no-store" });
    if (response.status === 401) {
      askToken(token !== null);
      again = false; // until a token is entered
      return;
    }
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    show("token-form", false);
    show("error", false);
    render(body);
  } catch (err) {
    $("error").textContent = `The dashboard cannot read the run just now: ${err.message}. Retrying.`;
    show("error", true);
    $("badge").className = "badge offline";
    $("badge").textContent = "offline";
  } finally {
    if (again) setTimeout(poll, POLL_MS);
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  show("token-form", false);
  poll();
});

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => last && render(last), 200);
});

poll();
