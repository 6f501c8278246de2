// FedRot dashboard: polls the JSON API (/api/v1) and redraws; plain JS, no build step.
"use strict";

const POLL_MS = 2000;
const API = "/api/v1";
const params = new URLSearchParams(location.search);
const runId = params.get("run") || "current";
let readToken = params.get("token") || localStorage.getItem("fedrot-read-token") || "";
let deadline = null;
let serverOffset = 0;

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));
const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)} %`);
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
const reports = (rounds, key) => rounds.some((r) => r[key] !== null && r[key] !== undefined);

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function withToken(url) {
  return readToken ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(readToken)}` : url;
}

async function getJson(path) {
  const headers = readToken ? { Authorization: `Bearer ${readToken}` } : {};
  const response = await fetch(API + path, { headers });
  const body = await response.json();
  if (!response.ok) {
    const error = new Error(`${body.error}: ${JSON.stringify(body.detail)}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function showOverview(o) {
  $("run-id").textContent = o.run.run_id;
  $("activity").textContent = o.activity;
  $("paused").hidden = !o.paused;
  $("admin").hidden = !o.live; // a stored run (or the read-only dashboard) has no one to act on
  $("round-number").textContent = o.current_round === null ? "–" : o.current_round;
  $("round-total").textContent = o.run.rounds_total ?? "–";
  $("round-phase").textContent = o.round_phase ? `round ${o.round_phase}, ${o.run.rounds_completed} completed` : "";
  $("reported").textContent = o.clients_reported;
  $("sampled").textContent = o.clients_sampled;
  $("enrolled").textContent = o.clients_enrolled;
  $("base-model").textContent = `${o.base_model ?? "–"} (${o.task ?? "?"})`;
  $("rank").textContent = o.lora_rank ?? "–";
  $("strategy").textContent = o.strategy ?? "–";
  $("lambda").textContent = o.alignment_strength ?? "–";
  deadline = o.deadline;
  serverOffset = o.server_time - Date.now() / 1000;
  tick();
}

function tick() {
  if (deadline === null) { $("countdown").textContent = "–"; return; }
  const left = Math.max(0, deadline - (Date.now() / 1000 + serverOffset));
  const m = Math.floor(left / 60), s = Math.floor(left % 60);
  $("countdown").textContent = `${m}:${String(s).padStart(2, "0")} left`;
}

function showClients(clients) {
  const body = $("clients").tBodies[0];
  body.replaceChildren();
  const admin = Boolean($("admin-token").value);
  document.querySelectorAll(".admin-only").forEach((e) => { e.hidden = !admin; });
  for (const c of clients) {
    const row = body.insertRow();
    const about = Object.entries(c.info).map(([k, v]) => `${k}: ${v}`);
    cell(row, c.name).title = [`enrolled ${when(c.enrolled_at)}`, ...about].join("\n");
    cell(row, c.status);
    cell(row, when(c.last_seen));
    cell(row, `${c.rounds_reported} / ${c.rounds_joined}`, "num");
    cell(row, c.samples, "num");
    cell(row, bytes(c.bytes_up), "num");
    cell(row, bytes(c.bytes_down), "num");
    cell(row, fmt(c.last_train_loss), "num");
    cell(row, c.rotation_distance === null ? "–" : `${fmt(c.rotation_distance, 3)} / ${fmt(c.rotation_distance_max, 3)} (r${c.rotation_round})`, "num");
    if (c.last_upload_refused) cell(row, `refused: ${c.refusal_reason} (${c.refusal_detail})`, "refused");
    else if (c.last_upload_interrupted) cell(row, `interrupted, resumable (${c.interruption_detail})`, "interrupted");
    else cell(row, c.rounds_reported ? "accepted" : "–");
    const action = row.insertCell();
    action.className = "admin-only";
    action.hidden = !admin;
    if (admin && c.status !== "revoked") {
      const button = document.createElement("button");
      button.textContent = "Revoke";
      button.onclick = () => act(`clients/${encodeURIComponent(c.name)}/revoke`);
      action.appendChild(button);
    }
  }
}

// The held-out columns of the rounds table: accuracy (classification, and any run before it
// reports), exact match and perplexity only for runs whose rounds report them.
const EVALUATION_COLUMNS = [["accuracy", pct], ["exact_match", pct], ["perplexity", fmt]];

function evaluationColumns(rounds) {
  const generative = reports(rounds, "exact_match") || reports(rounds, "perplexity");
  return EVALUATION_COLUMNS.filter(([key]) => reports(rounds, key) || (key === "accuracy" && !generative));
}

function showRounds(rounds) {
  const columns = evaluationColumns(rounds);
  for (const [key] of EVALUATION_COLUMNS) $(`col-${key}`).hidden = !columns.some(([k]) => k === key);
  const body = $("rounds").tBodies[0];
  body.replaceChildren();
  for (const r of rounds) {
    const row = body.insertRow();
    cell(row, r.round, "num");
    cell(row, r.phase);
    cell(row, `${r.reporters.length} / ${r.participants.length}`, "num");
    cell(row, r.samples, "num");
    cell(row, fmt(r.train_loss), "num");
    for (const [key, show] of columns) cell(row, show(r[key]), `num ${key}`);
    cell(row, fmt(r.aggregation_error), "num");
    cell(row, fmt(r.relative_aggregation_error), "num");
    cell(row, bytes(r.bytes_in), "num");
    cell(row, bytes(r.bytes_out), "num");
    cell(row, r.duration_s === null ? "–" : `${r.duration_s < 10 ? r.duration_s.toFixed(2) : r.duration_s.toFixed(1)} s`, "num");
  }
  drawRoundCharts(rounds);
}

const LAYOUT = { margin: { l: 55, r: 55, t: 40, b: 30 }, legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", xanchor: "left" },
                 title: { x: 0.98, xanchor: "right" }, font: { size: 11 } };
const ROUND_AXIS = { dtick: 1, tickprefix: "round " };
const CONFIG = { displaylogo: false, responsive: true };

function draw(id, traces, layout) {
  const title = { ...LAYOUT.title, ...(layout.title || {}) };
  Plotly.react(id, traces, { ...LAYOUT, ...layout, title }, CONFIG);
}

// The quality axis: exact match for instruction tuning (when the rounds report it), else accuracy.
function qualityOf(closed) {
  return reports(closed, "exact_match") ? { key: "exact_match", label: "exact match" } : { key: "accuracy", label: "accuracy" };
}

function drawRoundCharts(rounds) {
  const x = rounds.map((r) => r.round);
  const closed = rounds.filter((r) => r.phase === "closed");
  const cx = closed.map((r) => r.round);
  const quality = qualityOf(closed);
  draw("chart-loss", [
    { x, y: rounds.map((r) => r.train_loss), name: "train loss", mode: "lines+markers" },
    { x: cx, y: closed.map((r) => r[quality.key]), name: `held-out ${quality.label}`, mode: "lines+markers", yaxis: "y2" },
  ], { title: { text: `Train loss and ${quality.label}` }, xaxis: ROUND_AXIS,
       yaxis: { title: { text: "loss" } }, yaxis2: { title: { text: quality.label }, overlaying: "y", side: "right", range: [0, 1], tickmode: "auto", showgrid: false } });
  drawPerplexity(closed);
  draw("chart-error", [
    { x: cx, y: closed.map((r) => r.aggregation_error), name: "‖Σ pᵢBᵢAᵢ − B̄Ā‖", mode: "lines+markers" },
    { x: cx, y: closed.map((r) => r.relative_aggregation_error), name: "relative", mode: "lines+markers" },
  ], { title: { text: "Aggregation error (log)" }, xaxis: ROUND_AXIS, yaxis: { type: "log" } });
  draw("chart-bytes", [
    { x, y: rounds.map((r) => r.bytes_in), name: "uploaded", type: "bar" },
    { x, y: rounds.map((r) => r.bytes_out), name: "downloaded", type: "bar" },
  ], { title: { text: "Bytes per round" }, xaxis: ROUND_AXIS, barmode: "group" });
  draw("chart-duration", [
    { x: cx, y: closed.map((r) => r.duration_s), name: "duration (s)", type: "bar" },
  ], { title: { text: "Round duration (s)" }, xaxis: ROUND_AXIS });
}

// Held-out perplexity of the global adapter (completion tokens only for instruction tuning):
// its own chart, shown only for runs that report it.
function drawPerplexity(closed) {
  const chart = $("chart-perplexity");
  chart.hidden = !reports(closed, "perplexity");
  if (chart.hidden) return;
  draw("chart-perplexity", [
    { x: closed.map((r) => r.round), y: closed.map((r) => r.perplexity), name: "held-out perplexity", mode: "lines+markers" },
  ], { title: { text: "Held-out perplexity (log)" }, xaxis: ROUND_AXIS,
       yaxis: { type: "log", title: { text: "perplexity" } } });
}

// Module names without the dotted parts they all share: "0.query", "1.value", ...
function shortNames(modules) {
  const parts = modules.map((name) => name.split("."));
  if (parts.length < 2) return parts.map((p) => p[p.length - 1] ?? "");
  const keep = (i) => parts.some((p) => p[i] !== parts[0][i]);
  return parts.map((p) => p.filter((_, i) => keep(i)).join(".") || p.join("."));
}

function showModules(m) {
  const names = shortNames(m.modules.map((e) => e.module));
  draw("chart-modules", [
    { x: names, y: m.modules.map((e) => e.aggregation_error), name: "aggregation error", type: "bar", offsetgroup: 1 },
    { x: names, y: m.modules.map((e) => e.rotation_distance), name: "mean ‖R − I‖", type: "bar", yaxis: "y2", offsetgroup: 2 },
  ], { title: { text: m.round === null ? "Per module: no closed round yet" : `Per module, round ${m.round} (aligned ${m.aligned ?? "none"})` },
       barmode: "group", yaxis: { title: { text: "error" } },
       yaxis2: { title: { text: "‖R − I‖" }, overlaying: "y", side: "right", tickmode: "auto", showgrid: false } });
}

function showAdapters(adapters) {
  const body = $("adapters").tBodies[0];
  body.replaceChildren();
  for (const a of adapters.slice().reverse()) {
    const row = body.insertRow();
    cell(row, a.name);
    cell(row, bytes(a.size_bytes), "num");
    cell(row, a.sha256, "sha");
    for (const [url, label, cls] of [[a.zip_url, "zip", "download-zip"], [a.safetensors_url, "safetensors", "download-safetensors"]]) {
      const link = document.createElement("a");
      link.href = withToken(url);
      link.textContent = label;
      link.className = cls;
      link.dataset.sha256 = a.sha256;
      row.insertCell().appendChild(link);
    }
  }
}

async function act(action) {
  const token = $("admin-token").value;
  const response = await fetch(`${API}/runs/${encodeURIComponent(runId)}/${action}`, {
    method: "POST", headers: { Authorization: `Bearer ${token}` },
  });
  const body = await response.json();
  $("admin-result").textContent = response.ok ? body.detail : `${response.status} ${body.error}: ${body.detail}`;
  refresh();
}

async function refresh() {
  const run = encodeURIComponent(runId);
  try {
    const [overview, clients, rounds, modules, adapters] = await Promise.all([
      getJson(`/runs/${run}`), getJson(`/runs/${run}/clients`), getJson(`/runs/${run}/rounds`),
      getJson(`/runs/${run}/modules`), getJson(`/runs/${run}/adapters`),
    ]);
    showOverview(overview);
    showClients(clients);
    showRounds(rounds);
    showModules(modules);
    showAdapters(adapters);
    $("error").hidden = true;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("error").textContent = error.message;
    $("error").hidden = false;
    $("login").hidden = !(error.status === 401 || error.status === 403);
  }
}

$("read-token-save").onclick = () => {
  readToken = $("read-token").value;
  localStorage.setItem("fedrot-read-token", readToken);
  refresh();
};
document.querySelectorAll("#admin button").forEach((b) => { b.onclick = () => act(b.dataset.action); });
refresh();
setInterval(refresh, POLL_MS);
setInterval(tick, 1000);
