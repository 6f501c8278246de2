// Updates of the page that touch the DOM only where the data changed: a cell keeps its node
// (and a selection inside it) for as long as what it shows stays the same.

export const $ = (id) => document.getElementById(id);

export function setText(id, text) {
  const node = $(id);
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

export function setHidden(node, hidden) {
  if (node.hidden !== hidden) node.hidden = hidden;
}

// A cell: a string, or {text, cls, title, href, linkCls, data, nav, action, client}.
function render(td, spec) {
  const s = typeof spec === "object" && spec !== null ? spec : { text: spec };
  td.className = s.cls ?? "";
  if (s.title) td.title = s.title; else td.removeAttribute("title");
  if (s.href) {
    const link = document.createElement("a");
    link.href = s.href;
    link.textContent = s.text;
    if (s.linkCls) link.className = s.linkCls;
    if (s.nav) link.dataset.nav = s.nav;
    for (const [k, v] of Object.entries(s.data ?? {})) link.dataset[k] = v;
    td.replaceChildren(link);
  } else if (s.action) {
    const button = document.createElement("button");
    button.textContent = s.text;
    button.dataset.action = s.action;
    if (s.client) button.dataset.client = s.client;
    td.replaceChildren(button);
  } else {
    td.textContent = s.text ?? "";
  }
}

function syncCells(tr, cells, tag) {
  while (tr.cells.length > cells.length) tr.lastElementChild.remove();
  cells.forEach((spec, j) => {
    let td = tr.cells[j];
    if (!td) { td = document.createElement(tag); tr.appendChild(td); }
    const sig = JSON.stringify(spec ?? "");
    if (td.dataset.sig !== sig) { render(td, spec ?? ""); td.dataset.sig = sig; }
  });
}

// Makes ``section`` (a tbody or thead) hold ``rows`` ([{key, cells}]) in order, reusing the
// rows and cells already there.
export function syncRows(section, rows, tag = "td") {
  const keep = new Set(rows.map((r) => r.key));
  for (const tr of [...section.rows]) if (!keep.has(tr.dataset.key)) tr.remove();
  const byKey = new Map([...section.rows].map((tr) => [tr.dataset.key, tr]));
  rows.forEach((row, i) => {
    let tr = byKey.get(row.key);
    if (!tr) { tr = document.createElement("tr"); tr.dataset.key = row.key; }
    if (section.rows[i] !== tr) section.insertBefore(tr, section.rows[i] ?? null);
    syncCells(tr, row.cells, tag);
  });
}

export function syncTable(table, headers, rows) {
  syncRows(table.tHead, [{ key: "head", cells: headers }], "th");
  syncRows(table.tBodies[0], rows);
}

export function clearTable(table) {
  table.tHead.replaceChildren();
  table.tBodies[0].replaceChildren();
}

// A <select>'s options ([{value, text}]), keeping the chosen one when it is still offered.
export function syncOptions(select, options) {
  const sig = JSON.stringify(options);
  if (select.dataset.sig === sig) return;
  const chosen = select.value;
  select.replaceChildren(...options.map((o) => new Option(o.text, o.value)));
  select.value = options.some((o) => o.value === chosen) ? chosen : options[0]?.value ?? "";
  select.dataset.sig = sig;
}
