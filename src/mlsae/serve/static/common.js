// What every page shares: the route, JSON with errors shown on the page, links, number formats.

export const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent); // ["runs", run, ...]
export const runName = parts[0] === "runs" ? parts[1] : null;
export const query = new URLSearchParams(location.search);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

export function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

export async function api(path) {
  const response = await fetch(path);
  const body = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : (body.detail || []).map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

export function latentHref(run, latent, layer = null) {
  const base = `/runs/${encodeURIComponent(run)}/latents/${latent}`;
  return layer === null || layer === undefined ? base : `${base}?layer=${layer}`;
}

export function latentLink(run, latent, layer = null) {
  const label = layer === null || layer === undefined ? `#${latent}` : `L${layer}/#${latent}`;
  return el("a", { href: latentHref(run, latent, layer), class: "latent-link", text: label });
}

export function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : (+v.toPrecision(digits)).toString();
}

export function table(columns, rows, render = {}) {
  const head = el("tr", {}, ...columns.map((c) => el("th", { text: c })));
  const body = rows.map((r) => el("tr", {}, ...columns.map((c) => {
    const cell = el("td");
    const out = render[c] ? render[c](r[c], r) : fmt(r[c]);
    cell.append(out);
    return cell;
  })));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

// The header: the run, its settings and the pages of this run.
export async function header(current) {
  const runs = await api("/api/runs");
  const here = runs.find((r) => r.name === runName);
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    el("a", { href: "/", text: "runs" }),
    " / ",
    el("a", { href: `/runs/${encodeURIComponent(runName)}`, text: runName, class: current === "overview" ? "here" : null }),
    " · ",
    el("a", { href: `/runs/${encodeURIComponent(runName)}/prompt`, text: "prompt", class: current === "prompt" ? "here" : null }),
  );
  if (here) {
    document.getElementById("settings").textContent =
      `${here.arch} on ${here.model} · layers ${here.layers[0]}–${here.layers[here.layers.length - 1]} (${here.layers.length}) · ` +
      `${here.n_latents.toLocaleString("en")} latents${here.latent_space === "per_layer" ? " per layer" : ""} · k ${here.k} · ` +
      `${(here.train_tokens || 0).toLocaleString("en")} training tokens`;
  }
  return here;
}
