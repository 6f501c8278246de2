// The charts (plotly.js from /static, no CDN). Rounds are counted from 1 on every axis; an
// axis always says its unit; a chart with nothing to show has no axes, only a line saying so;
// a chart is drawn again only when its data changed.

import { $ } from "./dom.js";
import { METRICS } from "./format.js";

const LAYOUT = {
  margin: { l: 60, r: 60, t: 36, b: 46 }, font: { size: 11 },
  legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", xanchor: "left" },
  paper_bgcolor: "#fff", plot_bgcolor: "#fff",
};
const CONFIG = { displaylogo: false, responsive: true, displayModeBar: false };
const drawn = new Map(); // chart id -> signature of what it shows

const hasData = (traces) => traces.some((t) => t.y.some((v) => v !== null && v !== undefined));
const present = (rows, key) => rows.some((r) => r[key] !== null && r[key] !== undefined);

export function resetCharts() {
  for (const id of drawn.keys()) {
    const chart = $(id);
    if (chart && chart.data) Plotly.purge(chart);
    if (chart) chart.replaceChildren();
  }
  drawn.clear();
}

function draw(id, traces, layout, empty) {
  const chart = $(id);
  const full = { ...LAYOUT, ...layout, title: { text: layout.title, x: 0.01, xanchor: "left", y: 0.98, font: { size: 13 } } };
  const sig = JSON.stringify(hasData(traces) ? [traces, full] : empty);
  if (drawn.get(id) === sig) return;
  drawn.set(id, sig);
  if (!hasData(traces)) {
    if (chart.data) Plotly.purge(chart);
    const box = document.createElement("div");
    box.className = "chart-empty";
    box.append(Object.assign(document.createElement("strong"), { textContent: layout.title }),
               Object.assign(document.createElement("p"), { textContent: empty }));
    chart.replaceChildren(box);
    return;
  }
  if (!chart.data) chart.replaceChildren();
  Plotly.react(chart, traces, full, CONFIG);
}

// The x axis of round charts: rounds 1 .. the run's total (or the last shown), whole numbers.
function roundAxis(last) {
  return { title: { text: "round" }, range: [0.5, last + 0.5], tickmode: last <= 12 ? "linear" : "auto",
           tick0: 1, dtick: last <= 12 ? 1 : undefined, tickformat: "d", zeroline: false };
}

const BLUE = "#1f77b4", ORANGE = "#ff7f0e";
// A line with markers; ``color`` and ``dash`` style it, the rest goes to plotly as it is.
function line(x, y, name, { color, dash, ...more } = {}) {
  const style = color || dash ? { line: { color, dash }, marker: { color } } : {};
  return { x, y, name, mode: "lines+markers", type: "scatter", ...style, ...more };
}
const hover = (unit) => `round %{x}: %{y${unit}}<extra>%{fullData.name}</extra>`;

// The quality figure: exact match for instruction tuning (when reported), else accuracy.
export function qualityOf(closed) {
  return present(closed, "exact_match") ? "exact_match" : "accuracy";
}

export function drawRoundCharts(rounds, total) {
  const closed = rounds.filter((r) => r.phase === "closed");
  const x = rounds.map((r) => r.round + 1);
  const cx = closed.map((r) => r.round + 1);
  const last = Math.max(total ?? 0, ...x, 1);
  const axis = roundAxis(last);
  const quality = qualityOf(closed);
  const label = METRICS[quality].label;
  draw("chart-loss", [
    line(x, rounds.map((r) => r.train_loss), "train loss", { hovertemplate: hover(":.4g") }),
    line(cx, closed.map((r) => r[quality]), `held-out ${label}`, { yaxis: "y2", hovertemplate: hover(":.1%") }),
  ], { title: `Train loss and held-out ${label}`, xaxis: axis,
       yaxis: { title: { text: "train loss (cross-entropy, nats)" }, rangemode: "tozero" },
       yaxis2: { title: { text: `${label} (%)` }, overlaying: "y", side: "right", range: [0, 1],
                 tickmode: "auto", tickformat: ".0%", showgrid: false } }, "no round reported a loss yet");
  drawPerplexity(closed, axis);
  drawErrors(closed, axis);
  drawDrift(closed, axis);
  draw("chart-bytes", [
    { x, y: rounds.map((r) => r.bytes_in), name: "uploaded by clients", type: "bar", hovertemplate: hover(":.3s") + "B" },
    { x, y: rounds.map((r) => r.bytes_out), name: "sent to clients", type: "bar", hovertemplate: hover(":.3s") + "B" },
  ].map((t) => ({ ...t, y: t.y.some((v) => v > 0) ? t.y : t.y.map(() => null) })),
  { title: "Adapter bytes per round", xaxis: axis, barmode: "group",
    yaxis: { title: { text: "bytes" }, tickformat: "~s", ticksuffix: "B", rangemode: "tozero" } },
  "no adapter moved yet");
  draw("chart-duration", [
    { x: cx, y: closed.map((r) => r.duration_s), name: "round duration", type: "bar", hovertemplate: hover(":.1f") + " s" },
  ], { title: "Round duration", xaxis: axis, showlegend: false,
       yaxis: { title: { text: "seconds" }, ticksuffix: " s", rangemode: "tozero" } }, "no round closed yet");
}

// Held-out perplexity (completion tokens only for instruction tuning): only for runs that report it.
function drawPerplexity(closed, axis) {
  const chart = $("chart-perplexity");
  chart.hidden = !present(closed, "perplexity");
  if (chart.hidden) return;
  draw("chart-perplexity", [
    line(closed.map((r) => r.round + 1), closed.map((r) => r.perplexity), "held-out perplexity", { hovertemplate: hover(":.4g") }),
  ], { title: "Held-out perplexity (log scale)", xaxis: axis, showlegend: false,
       yaxis: { type: "log", title: { text: "perplexity (per token)" } } }, "no perplexity yet");
}

// Absolute error on the left axis, relative error on the right one (both log); FedIT's error
// for the same uploads, dashed, where the rounds report it.
function drawErrors(closed, axis) {
  const cx = closed.map((r) => r.round + 1);
  const y = (key) => closed.map((r) => r[key]);
  const traces = [
    line(cx, y("aggregation_error"), "absolute ‖Σ pᵢBᵢAᵢ − B̄Ā‖_F", { color: BLUE, hovertemplate: hover(":.3e") }),
    line(cx, y("relative_aggregation_error"), "relative (÷ the update's norm)", { color: ORANGE, yaxis: "y2", hovertemplate: hover(":.2%") }),
  ];
  if (present(closed, "fedit_aggregation_error")) {
    traces.push(line(cx, y("fedit_aggregation_error"), "FedIT, absolute (same uploads)",
                     { color: BLUE, dash: "dash", hovertemplate: hover(":.3e") }));
  }
  if (present(closed, "fedit_relative_aggregation_error")) {
    traces.push(line(cx, y("fedit_relative_aggregation_error"), "FedIT, relative (same uploads)",
                     { color: ORANGE, dash: "dash", yaxis: "y2", hovertemplate: hover(":.2%") }));
  }
  draw("chart-error", traces, {
    title: "Aggregation error (log scales)", xaxis: axis,
    yaxis: { type: "log", title: { text: "absolute error (Frobenius norm)" }, dtick: "D2", exponentformat: "power" },
    yaxis2: { type: "log", title: { text: "relative error (fraction of the update norm)" }, overlaying: "y", side: "right",
              tickmode: "auto", dtick: "D2", showgrid: false, exponentformat: "power" },
  }, "no round closed yet");
}

// The share of the clients' factor drift the rotation removed: only for rounds that report it.
function drawDrift(closed, axis) {
  const chart = $("chart-drift");
  chart.hidden = !present(closed, "rotation_drift_share");
  if (chart.hidden) return;
  draw("chart-drift", [
    line(closed.map((r) => r.round + 1), closed.map((r) => r.rotation_drift_share), "drift removed by the rotation", { hovertemplate: hover(":.1%") }),
  ], { title: "Factor drift removed by the rotation", xaxis: axis, showlegend: false,
       yaxis: { title: { text: "share of the drift (%)" }, range: [0, 1], tickformat: ".0%" } }, "not reported");
}

// Module names without the dotted parts they all share: "0.query", "1.value", ...
function shortNames(modules) {
  const parts = modules.map((name) => name.split("."));
  if (parts.length < 2) return parts.map((p) => p[p.length - 1] ?? "");
  const keep = (i) => parts.some((p) => p[i] !== parts[0][i]);
  return parts.map((p) => p.filter((_, i) => keep(i)).join(".") || p.join("."));
}

export function drawModules(m) {
  const names = shortNames(m.modules.map((e) => e.module));
  const title = m.round === null ? "Per module" : `Per module, round ${m.round + 1} (aligned: ${m.aligned ?? "none"})`;
  const empty = m.round === null ? "no closed round with a report yet" : `round ${m.round + 1} has no per-module report`;
  draw("chart-modules", [
    { x: names, y: m.modules.map((e) => e.aggregation_error), name: "aggregation error", type: "bar", offsetgroup: 1,
      hovertemplate: "%{x}: %{y:.3e}<extra>aggregation error</extra>" },
    { x: names, y: m.modules.map((e) => e.rotation_distance), name: "mean ‖R − I‖_F", type: "bar", yaxis: "y2", offsetgroup: 2,
      hovertemplate: "%{x}: %{y:.3f}<extra>mean ‖R − I‖_F</extra>" },
  ], { title, barmode: "group", xaxis: { title: { text: "LoRA module" }, automargin: true },
       yaxis: { title: { text: "aggregation error (Frobenius norm)" }, rangemode: "tozero" },
       yaxis2: { title: { text: "mean ‖R − I‖_F (Frobenius norm)" }, overlaying: "y", side: "right",
                 tickmode: "auto", rangemode: "tozero", showgrid: false } }, empty);
}
