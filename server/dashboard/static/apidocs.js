// The dashboard's OpenAPI schema as a page: endpoints by tag (parameters, answers) and the JSON
// shapes. Served from the dashboard itself, so it needs no CDN.
"use strict";

const el = (tag, text, cls) => {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
};
const refName = (ref) => ref.split("/").pop();

function typeOf(schema) {
  if (!schema) return "";
  if (schema.$ref) return refName(schema.$ref);
  if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
  if (schema.type === "array") return `${typeOf(schema.items)}[]`;
  if (schema.type === "object" && schema.additionalProperties) return `{str: ${typeOf(schema.additionalProperties)}}`;
  return schema.type || "any";
}

function operation(path, method, op) {
  const box = el("details", undefined, "endpoint");
  const summary = el("summary");
  summary.append(el("code", method.toUpperCase(), `method ${method}`), " ", el("code", path));
  if (op.summary) summary.append(" ", el("span", op.summary, "muted"));
  box.append(summary);
  if (op.description) box.append(el("p", op.description));
  const params = op.parameters || [];
  if (params.length) {
    const list = el("ul");
    for (const p of params) list.append(el("li", `${p.name} (${p.in}${p.required ? ", required" : ""}): ${typeOf(p.schema)}`));
    box.append(el("h4", "parameters"), list);
  }
  const answers = el("ul");
  for (const [code, r] of Object.entries(op.responses || {})) {
    const schema = r.content && Object.values(r.content)[0].schema;
    answers.append(el("li", `${code} ${r.description || ""}${schema ? ` → ${typeOf(schema)}` : ""}`));
  }
  box.append(el("h4", "answers"), answers);
  return box;
}

function shape(name, schema) {
  const box = el("details", undefined, "endpoint");
  box.append(el("summary", name));
  if (schema.description) box.append(el("p", schema.description));
  const list = el("ul");
  for (const [field, s] of Object.entries(schema.properties || {})) {
    const line = el("li");
    line.append(el("code", field), `: ${typeOf(s)}${s.description ? ` — ${s.description}` : ""}`);
    list.append(line);
  }
  box.append(list);
  return box;
}

async function render() {
  const main = document.getElementById("api-docs");
  const spec = await (await fetch("/api/v1/openapi.json")).json();
  main.replaceChildren(el("h2", `${spec.info.title} ${spec.info.version}`));
  const byTag = new Map();
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operation(path, method, op));
    }
  }
  for (const [tag, ops] of byTag) main.append(el("h3", tag), ...ops);
  main.append(el("h3", "shapes"));
  for (const [name, schema] of Object.entries(spec.components?.schemas || {})) main.append(shape(name, schema));
}

render().catch((error) => { document.getElementById("api-docs").textContent = `could not load the schema: ${error}`; });
