// FedRot dashboard: polls the JSON API (/api/v1) and updates the page where the data changed;
// plain JS modules, no build step. Two views: every run (?view=runs) and one run (?run=ID,
// default the current one), switched without a reload.

import { $, setHidden, setText, syncTable } from "./dom.js";
import { best, date, DASH } from "./format.js";
import { moduleRound, resetRun, showAdapters, showClients, showModules, showOverview, showRounds, tick } from "./run.js";

const POLL_MS = 2000;
const API = "/api/v1";
const route = { view: "run", runId: "current", generation: 0 };
let session = null;
let busy = false;

class ApiFailure extends Error {
  constructor(status, body) {
    super(`${body.error ?? status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`);
    this.status = status;
  }
}

// The session cookie rides along (same origin); API users send the token in a header instead.
async function call(path, options = {}) {
  const response = await fetch(API + path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiFailure(response.status, body);
  return body;
}

function readLocation() {
  const params = new URLSearchParams(location.search);
  route.view = params.get("view") === "runs" ? "runs" : "run";
  route.runId = params.get("run") || "current";
  route.generation += 1;
}

function showView() {
  setHidden($("runs-view"), route.view !== "runs");
  setHidden($("run-view"), route.view !== "run");
  $("nav-runs").classList.toggle("active", route.view === "runs");
  for (const id of ["run-id", "stage"]) setHidden($(id), route.view !== "run");
}

function navigate(url, push = true) {
  if (push) history.pushState(null, "", url);
  readLocation();
  resetRun();
  showView();
  refresh();
}

// ---- runs view

function runCells(r) {
  return [
    { text: r.run_id, href: `/?run=${encodeURIComponent(r.run_id)}`, nav: "run", linkCls: "run-link" },
    { text: r.queue_position ? `${r.phase} (#${r.queue_position})` : r.phase, cls: `status ${r.phase}` },
    r.strategy ?? DASH,
    { text: r.alignment_strength ?? DASH, cls: "num" },
    { text: `${r.rounds_completed} / ${r.rounds_total ?? "?"}`, cls: "num" },
    best(r.best),
    date(r.created_at),
    date(r.finished_at),
  ];
}

function showRuns(runs) {
  const headers = ["run", "status", "strategy", "λ", "rounds done", "best held-out", "started", "ended"];
  syncTable($("runs"), headers, runs.slice().reverse().map((r) => ({ key: r.run_id, cells: runCells(r) })));
  setText("nav-runs", `All runs (${runs.length})`);
}

// ---- polling

async function loadRun(run) {
  const which = moduleRound();
  const modules = which === "" ? `/runs/${run}/modules` : `/runs/${run}/modules?round=${which}`;
  const [overview, clients, rounds, modulesOf, adapters, runs] = await Promise.all([
    call(`/runs/${run}`), call(`/runs/${run}/clients`), call(`/runs/${run}/rounds`),
    call(modules), call(`/runs/${run}/adapters`), call("/runs"),
  ]);
  return { overview, clients, rounds, modulesOf, adapters, runs, which };
}

function showRun(data) {
  showOverview(data.overview, session);
  showRounds(data.rounds);
  showClients(data.clients, data.overview);
  if (data.which === moduleRound()) showModules(data.modulesOf);
  showAdapters(data.adapters);
  setText("nav-runs", `All runs (${data.runs.length})`);
}

async function refresh() {
  if (!session?.can_read) return;
  const generation = route.generation;
  busy = true;
  try {
    if (route.view === "runs") {
      const runs = await call("/runs");
      if (generation === route.generation) showRuns(runs);
    } else {
      const data = await loadRun(encodeURIComponent(route.runId));
      if (generation === route.generation) showRun(data); // else: the user moved on meanwhile
    }
    if (generation === route.generation) {
      setHidden($("error"), true);
      setText("updated", `updated ${new Date().toLocaleTimeString()}`);
    }
  } catch (error) {
    if (generation !== route.generation) return;
    setText("error", error.message);
    setHidden($("error"), false);
    if (error.status === 401) await askToSignIn();
  } finally {
    busy = false;
  }
}

// ---- session: the read token traded once for an HttpOnly cookie

async function askToSignIn() {
  session = await call("/session");
  setHidden($("login"), session.can_read);
  setHidden($("sign-out"), !(session.read_token_required && session.can_read));
}

async function signIn(token) {
  try {
    session = await call("/session", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
  } catch (error) {
    setText("error", error.message);
    setHidden($("error"), false);
    return false;
  }
  setHidden($("login"), true);
  setHidden($("error"), true);
  setHidden($("sign-out"), !session.read_token_required);
  return true;
}

async function start() {
  localStorage.removeItem("fedrot-read-token"); // older pages kept the token here
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) { // a link with ?token= (compose prints one): trade it, then drop it from the URL
    params.delete("token");
    history.replaceState(null, "", `${location.pathname}${params.size ? `?${params}` : ""}`);
  }
  readLocation();
  showView();
  await askToSignIn();
  if (token && !session.can_read) await signIn(token);
  refresh();
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("read-token");
  if (await signIn(input.value)) {
    input.value = "";
    refresh();
  }
});

$("sign-out").onclick = async () => {
  session = await call("/session", { method: "DELETE" });
  resetRun();
  await askToSignIn();
};

async function act(action) {
  const token = $("admin-token").value;
  const run = encodeURIComponent(route.runId);
  try {
    const body = await call(`/runs/${run}/${action}`, { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    setText("admin-result", body.detail);
  } catch (error) {
    setText("admin-result", `${error.status} ${error.message}`);
  }
  refresh();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-nav]");
  if (link && event.button === 0 && !(event.ctrlKey || event.metaKey || event.shiftKey)) {
    event.preventDefault();
    if (link.href !== location.href) navigate(link.href);
    return;
  }
  const button = event.target.closest("button[data-admin], button[data-action]");
  if (button?.dataset.admin) act(button.dataset.admin);
  else if (button?.dataset.action === "revoke") act(`clients/${encodeURIComponent(button.dataset.client)}/revoke`);
});
window.addEventListener("popstate", () => navigate(location.href, false));
$("module-round").addEventListener("change", () => refresh());
$("admin-token").addEventListener("input", () => refresh());

start();
setInterval(() => { if (!busy) refresh(); }, POLL_MS);
setInterval(tick, 1000);
