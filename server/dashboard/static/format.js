// How the dashboard writes numbers, sizes, times and percentages.

export const DASH = "–";
const missing = (v) => v === null || v === undefined;

export const num = (v, digits = 4) => (missing(v) ? DASH : Number(v).toPrecision(digits));
// A fraction in [0, 1] as a percentage: 0.362 -> "36.2 %".
export const pct = (v) => (missing(v) ? DASH : `${(100 * v).toFixed(1)} %`);
export const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : DASH);
export const date = (t) => (t ? new Date(t * 1000).toLocaleString() : DASH);

export function bytes(n) {
  if (missing(n)) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function seconds(s) {
  if (missing(s)) return DASH;
  return `${s < 10 ? s.toFixed(2) : s.toFixed(1)} s`;
}

// A span of time in words: "45 s", "3 min 20 s", "2 h 05 min".
export function span(s) {
  if (missing(s)) return DASH;
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

export const ago = (s) => (missing(s) ? DASH : `${span(s)} ago`);

// The held-out metrics the pages know: name, label, how to write a value, higher is better.
export const METRICS = {
  accuracy: { label: "accuracy", show: pct, fraction: true },
  exact_match: { label: "exact match", show: pct, fraction: true },
  perplexity: { label: "perplexity", show: (v) => num(v), fraction: false },
};

export function best(b) {
  if (!b) return DASH;
  const metric = METRICS[b.name] ?? { label: b.name, show: num };
  return `${metric.label} ${metric.show(b.value)} (round ${b.round + 1})`;
}
