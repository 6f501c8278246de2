// One run's page: the cards, the charts, the clients, rounds and downloads tables. Each
// ``show*`` takes what the API answered and touches only what changed.

import { drawModules, drawRoundCharts, qualityOf, resetCharts } from "./charts.js";
import { $, clearTable, setHidden, setText, syncOptions, syncTable } from "./dom.js";
import { DASH, METRICS, ago, best, bytes, clock, num, pct, seconds, span } from "./format.js";

const view = { deadline: null, offset: 0, stage: null, eta: null, etaAt: 0, total: null };
const TABLES = ["clients", "rounds", "adapters"];
const present = (rows, key) => rows.some((r) => r[key] !== null && r[key] !== undefined);
const FINISHED = new Set(["finished", "stopped"]);

export function resetRun() {
  Object.assign(view, { deadline: null, stage: null, eta: null, total: null });
  for (const id of TABLES) clearTable($(id));
  const select = $("module-round");
  select.replaceChildren();
  delete select.dataset.sig;
  resetCharts();
  for (const id of ["run-id", "round-number", "round-total", "round-stage", "countdown", "eta",
                    "base-model", "rank", "strategy", "lambda", "best"]) setText(id, DASH);
  setText("stage", "…");
  setHidden($("admin"), true);
}

// What the round card says under "N of M": the stage and the clients' share of it.
function stageLine(o) {
  switch (o.stage) {
    case "training": return `training: ${o.clients_reported} of ${o.clients_sampled} clients reported`;
    case "aggregating": return `aggregating the ${o.clients_reported} updates received`;
    case "evaluating": return "evaluating the new global adapter on held-out data";
    case "waiting": return o.current_round === null ? "waiting for clients to enrol" : "waiting for the next round";
    case "queued": return "queued: starts when the server is free";
    default: return `${o.stage}: ${o.run.rounds_completed} rounds completed`;
  }
}

export function showOverview(o, session) {
  view.total = o.run.rounds_total;
  setText("run-id", o.run.run_id);
  setText("stage", o.paused ? `${o.stage} (paused)` : o.stage);
  setHidden($("paused"), !o.paused);
  setText("round-number", o.round_number ?? DASH);
  setText("round-total", o.run.rounds_total ?? DASH);
  setText("round-stage", stageLine(o));
  setText("reported", o.clients_reported);
  setText("sampled", o.clients_sampled);
  setText("enrolled", o.clients_enrolled);
  setText("base-model", `${o.base_model ?? DASH} (${o.task ?? "?"})`);
  setText("rank", o.lora_rank ?? DASH);
  setText("strategy", o.strategy ?? DASH);
  setText("lambda", o.alignment_strength ?? DASH);
  setText("lambda-hint", o.lambda_hint ?? "");
  setHidden($("lambda-hint"), !o.lambda_hint);
  setText("best", best(o.run.best));
  view.deadline = o.deadline;
  view.stage = o.stage;
  view.eta = o.eta_s;
  view.etaAt = Date.now() / 1000;
  view.offset = o.server_time - Date.now() / 1000;
  // Admin actions only where they can work: an admin token is set up and this server runs the run.
  const admin = Boolean(session?.admin_enabled && o.live && !FINISHED.has(o.stage));
  setHidden($("admin"), !admin);
  tick();
}

// The time card, every second: the deadline while clients train, else what goes on; the
// estimate of the time left counts down between polls.
export function tick() {
  if (view.stage === null) return;
  if (view.deadline !== null) {
    setText("time-label", "Deadline");
    const left = view.deadline - (Date.now() / 1000 + view.offset);
    // Past it, the server closes the round (or extends it) at its next step: say so, not "0 s".
    setText("countdown", left > 0 ? `${span(left)} left` : `passed ${span(-left)} ago`);
  } else {
    setText("time-label", "Now");
    setText("countdown", FINISHED.has(view.stage) ? "done" : view.stage);
  }
  const eta = view.eta === null ? null : Math.max(0, view.eta - (Date.now() / 1000 - view.etaAt));
  setText("eta", eta === null ? "" : `≈ ${span(eta)} to the last round (mean round time)`);
}

function clientCells(c, o, admin) {
  const about = Object.entries(c.info).map(([k, v]) => `${k}: ${v}`);
  let upload = c.rounds_reported ? "accepted" : DASH;
  if (c.last_upload_refused) upload = { text: `refused: ${c.refusal_reason} (${c.refusal_detail})`, cls: "refused" };
  else if (c.last_upload_interrupted) upload = { text: `interrupted, resumable (${c.interruption_detail})`, cls: "interrupted" };
  const rotation = c.rotation_distance === null ? DASH : `${num(c.rotation_distance, 3)} / ${num(c.rotation_distance_max, 3)} (round ${c.rotation_round + 1})`;
  const cells = [
    { text: c.name, title: [`enrolled ${clock(c.enrolled_at)}`, ...about].join("\n") },
    { text: c.phase && c.status === "training" ? `${c.phase} ${pct(c.progress)}` : c.status,
      cls: `status ${c.status}`, title: c.declined ? `declined: ${c.declined}` : "" },
    { text: ago(o.server_time - c.last_seen), title: clock(c.last_seen) },
    { text: `${c.rounds_reported} / ${c.rounds_joined}`, cls: "num" },
    { text: String(c.samples), cls: "num" },
    { text: bytes(c.bytes_up), cls: "num" }, { text: bytes(c.bytes_down), cls: "num" },
    { text: num(c.last_train_loss), cls: "num" }, { text: rotation, cls: "num" }, upload,
  ];
  if (admin) cells.push(c.status === "revoked" ? "" : { text: "Revoke", action: "revoke", client: c.name });
  return cells;
}

export function showClients(clients, o) {
  const admin = !$("admin").hidden && Boolean($("admin-token").value);
  const headers = ["client", "status", "last heard from", "rounds reported / sampled", "samples",
                   "bytes up", "bytes down", "train loss", "‖R − I‖_F (mean / max)", "last upload"];
  if (admin) headers.push("");
  syncTable($("clients"), headers, clients.map((c) => ({ key: c.name, cells: clientCells(c, o, admin) })));
}

// The rounds table's optional columns: held-out figures and the diagnostics a round reports.
function roundColumns(rounds) {
  const generative = present(rounds, "exact_match") || present(rounds, "perplexity");
  const columns = Object.entries(METRICS)
    .filter(([key]) => present(rounds, key) || (key === "accuracy" && !generative))
    .map(([key, m]) => [m.label, (r) => m.show(r[key]), key]);
  columns.push(["aggregation error", (r) => num(r.aggregation_error)],
               ["relative error", (r) => num(r.relative_aggregation_error)]);
  if (present(rounds, "fedit_aggregation_error")) columns.push(["FedIT error (same uploads)", (r) => num(r.fedit_aggregation_error)]);
  if (present(rounds, "rotation_drift_share")) columns.push(["drift removed by the rotation", (r) => pct(r.rotation_drift_share)]);
  return columns;
}

export function showRounds(rounds) {
  const columns = roundColumns(rounds);
  const headers = ["round", "phase", "reported", "samples", "train loss", ...columns.map(([h]) => h),
                   "bytes in", "bytes out", "duration"];
  const rows = rounds.map((r) => ({ key: String(r.round), cells: [
    { text: String(r.round + 1), cls: "num" },
    r.evaluating ? "closed, evaluating" : r.phase,
    { text: `${r.reporters.length} / ${r.participants.length}`, cls: "num" },
    { text: String(r.samples), cls: "num" }, { text: num(r.train_loss), cls: "num" },
    ...columns.map(([, show, key]) => ({ text: show(r), cls: `num ${key ?? ""}`.trim() })),
    { text: bytes(r.bytes_in), cls: "num" }, { text: bytes(r.bytes_out), cls: "num" },
    { text: seconds(r.duration_s), cls: "num" },
  ] }));
  syncTable($("rounds"), headers, rows);
  drawRoundCharts(rounds, view.total);
  const closed = rounds.filter((r) => r.phase === "closed");
  syncOptions($("module-round"), [{ value: "", text: "latest" },
    ...closed.slice().reverse().map((r) => ({ value: String(r.round), text: `${r.round + 1}` }))]);
  return qualityOf(closed);
}

export function showModules(m) {
  drawModules(m);
}

export function showAdapters(adapters) {
  const rows = adapters.slice().reverse().map((a) => ({ key: a.name, cells: [
    a.round === null ? "initial" : `after round ${a.round + 1}`,
    { text: bytes(a.size_bytes), cls: "num" },
    { text: a.sha256, cls: "sha" },
    { text: "zip", href: a.zip_url, linkCls: "download-zip", data: { sha256: a.sha256 } },
    { text: "safetensors", href: a.safetensors_url, linkCls: "download-safetensors", data: { sha256: a.sha256 } },
  ] }));
  syncTable($("adapters"), ["adapter", "size", "SHA-256 of the weights", "PEFT folder", "weights"], rows);
}

export function moduleRound() {
  return $("module-round").value;
}
