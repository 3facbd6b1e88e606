// A text coded at every token and layer: click a token for its latents x layers heatmap and the
// top latents at each layer; every latent links to its page. The text lives in the URL (?text=).
import { heat, heatmap } from "./charts.js";
import { api, el, fmt, header, latentHref, latentLink, query, runName, showError, table } from "./common.js";

const main = document.getElementById("main");

function label(k) {
  return k.layer === null || k.layer === undefined ? `#${k.latent}` : `L${k.layer}/#${k.latent}`;
}

function latentHeatmap(holder, h, layers, id) {
  const chart = el("div", { id });
  holder.append(chart);
  heatmap(chart, h.values, {
    rowLabels: h.latents.map(label), colLabels: layers.map(String), xLabel: "layer", yLabel: "latent",
    tip: (i, j, v) => `${label(h.latents[i])} at layer ${layers[j]}: ${fmt(v, 3)}`,
    onClick: (i) => { location.href = latentHref(runName, h.latents[i].latent, h.latents[i].layer); },
  });
}

function render(d) {
  const out = el("div", { id: "result" });
  main.append(out);
  const counted = [];
  d.counted.forEach((c, i) => { if (c) counted.push(i); });
  const strip = el("div", { class: "tokens", id: "tokens" });
  const detail = el("div", { id: "token-detail" });
  out.append(el("h2", { text: "Tokens" }), el("p", { class: "note", text: "Click a token (underlined: it counts, shaded by its latents' total activity; the others are left out as in training)." }), strip, detail);
  const totals = d.heat.map((h) => h.values.flat().reduce((a, b) => a + b, 0));
  const most = Math.max(...totals, 1e-12);
  const spans = d.tokens.map((t, i) => {
    const row = counted.indexOf(i);
    const span = el("span", { class: d.counted[i] ? "counted" : null, text: t, "data-position": i,
      title: row >= 0 ? `activity ${fmt(totals[row], 3)}` : "left out (as in training)" });
    if (row >= 0) span.style.background = heat(0.6 * totals[row] / most);
    strip.append(span);
    return span;
  });
  function select(position) {
    const row = counted.indexOf(position);
    if (row < 0) return;
    spans.forEach((s) => s.classList.remove("selected"));
    spans[position].classList.add("selected");
    const here = new URLSearchParams(location.search);
    here.set("token", position);  // the view's address names the token too
    history.replaceState(null, "", `${location.pathname}?${here}`);
    detail.replaceChildren(el("h2", { text: `Token ${position}: ${JSON.stringify(d.tokens[position])}` }));
    const h = d.heat[row];
    if (!h.latents.length) {
      detail.append(el("p", { class: "note", text: "No latent fires here." }));
      return;
    }
    detail.append(el("p", { class: "note", text: "Its most active latents (rows) at each layer (columns); click a row for the latent." }));
    latentHeatmap(detail, h, d.layers, "token-heatmap");
    const rows = d.layers.map((layer, j) => ({ layer, top: d.cells[row][j] }));
    detail.append(el("h2", { text: "Top latents at each layer" }), table(["layer", "top"], rows, {
      top: (cell, r) => {
        const span = el("span");
        cell.forEach(([latent, act], n) => {
          if (n) span.append(", ");
          span.append(latentLink(runName, latent, d.latent_space === "per_layer" ? r.layer : null), ` ${fmt(act, 3)}`);
        });
        return span;
      },
    }));
  }
  strip.addEventListener("click", (e) => {
    const position = e.target.dataset && e.target.dataset.position;
    if (position !== undefined) select(Number(position));
  });
  if (d.overall && d.overall.latents.length) {
    out.append(el("h2", { text: "The whole text: the most active latents at each layer (maximum over tokens)" }));
    latentHeatmap(out, d.overall, d.layers, "prompt-heatmap");
  }
  // start on the token the address names, else on the one with the most activity
  const asked = Number(query.get("token"));
  if (query.has("token") && counted.includes(asked)) select(asked);
  else if (counted.length) select(counted[totals.indexOf(Math.max(...totals))]);
}

try {
  const run = await header("prompt");
  const text = query.get("text") || "";
  document.title = `mlsae explorer · ${runName} · prompt`;
  const box = el("textarea", { id: "text", rows: 4, placeholder: `Some text (at most ${run ? run.ctx : "the run's context"} tokens)` });
  box.value = text;
  const go = el("button", { id: "code", text: "code it" });
  const form = el("form", { id: "prompt-form" }, box, go);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    location.href = `${location.pathname}?${new URLSearchParams({ text: box.value })}`;
  });
  main.append(el("h1", { text: `${runName}: prompt` }), form);
  if (text) {
    const wait = el("p", { class: "note", id: "wait", text: "Coding the text (the first request loads the model)…" });
    main.append(wait);
    const d = await api(`/api/runs/${encodeURIComponent(runName)}/prompt?${new URLSearchParams({ text })}`);
    wait.remove();
    render(d);
  }
} catch (e) {
  document.getElementById("wait")?.remove();
  showError(e.message);
}
