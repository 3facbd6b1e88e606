// One latent: its statistics, layer profile, activation histogram, nearest latents by decoder
// cosine, and its top examples per layer with the activating token highlighted in context.
import { bars } from "./charts.js";
import { api, el, fmt, header, latentLink, parts, query, runName, showError, table } from "./common.js";

const main = document.getElementById("main");
const latent = Number(parts[3]);
const layer = query.get("layer");

function section(title, id, parent = main) {
  const box = el("section", { id }, el("h2", { text: title }));
  parent.append(box);
  return box;
}

function profile(d) {
  const box = section(d.latent_space === "joint" ? "Where it reads and writes: encoder and decoder block norms" : "Layer profile", "profile");
  const chart = el("div", { id: "profile-chart" });
  if (d.stats && d.stats.dead) box.append(el("p", { class: "note", text: "The latent never fired in the analysed tokens (dead there)." }));
  if (d.block_norms) {
    box.append(el("p", { class: "note", text: "Norm of the latent's encoder and decoder block at each layer (the decoder's say where it writes)." }), chart);
    bars(chart, d.block_norms.map((r) => r.layer), [
      { name: "encoder", values: d.block_norms.map((r) => r.enc_norm) }, { name: "decoder", values: d.block_norms.map((r) => r.dec_norm) },
    ], { xLabel: "layer", yLabel: "block norm" });
  }
  if (d.profile.length) {
    const byLayer = Object.fromEntries(d.profile.map((r) => [r.layer, r.probability]));
    const dist = el("div", { id: "distribution-chart" });
    box.append(el("p", { class: "note", text: "p(l): the share of the latent's activation at each layer, over the analysed tokens." }), dist);
    bars(dist, d.layers, [{ name: "p(l)", values: d.layers.map((l) => byLayer[l] || 0) }], { xLabel: "layer", yLabel: "p(l)" });
  }
}

function histogram(d) {
  const box = section("Activation histogram", "histogram");
  if (!d.histogram) {
    box.append(el("p", { class: "note", text: "No histogram table: analyse the run again to write one." }));
    return;
  }
  if (!d.histogram.length) {
    box.append(el("p", { class: "note", text: "No firing in the analysed tokens." }));
    return;
  }
  const chart = el("div", { id: "histogram-chart" });
  box.append(el("p", { class: "note", text: "Firings per activation bin (log-spaced bins)." }), chart);
  bars(chart, d.histogram.map((r) => fmt(Math.sqrt(r.bin_lo * r.bin_hi), 2)), [{ name: "firings", values: d.histogram.map((r) => r.count) }],
    { xLabel: "activation", yLabel: "firings" });
}

function nearest(d) {
  const box = section("Nearest latents by decoder cosine", "nearest");
  box.append(table(["latent", "cosine"], d.nearest, { latent: (v, r) => latentLink(runName, v, r.dictionary_layer) }));
}

const SHOWN = (t) => t.replace(/\n/g, "↵").replace(/\t/g, "⇥");  // one line per example

function example(row) {
  const line = el("div", { class: "example" });
  line.append(el("span", { class: "act", text: fmt(row.activation, 3) }));
  row.tokens.forEach((t, i) => line.append(el("span", { class: i === row.context_index ? "hit" : null, text: SHOWN(t) })));
  return line;
}

function examples(d) {
  const box = section("Top examples", "examples");
  if (d.examples_error) box.append(el("p", { class: "note", text: `Token ids instead of text: ${d.examples_error}` }));
  if (!d.examples.length) {
    box.append(el("p", { class: "note", text: "No examples in the analysed tokens." }));
    return;
  }
  if (d.latent_space === "joint") {  // one code per token: the same tokens rank first at every layer
    box.append(el("p", { class: "note", text: "Its largest activations (one joint code per token, written to every layer by its decoder blocks)." }),
      el("div", { id: "example-list" }, ...d.examples.map(example)));
    return;
  }
  const layers = [...new Set(d.examples.map((r) => r.layer))];
  const best = Object.fromEntries(layers.map((l) => [l, Math.max(...d.examples.filter((r) => r.layer === l).map((r) => r.activation))]));
  layers.sort((a, b) => best[b] - best[a]);
  const pick = el("select", { id: "example-layer" }, el("option", { value: "top", text: "the 3 strongest layers" }),
    el("option", { value: "all", text: "every layer (strongest first)" }),
    ...layers.map((l) => el("option", { value: l, text: `layer ${l} (max ${fmt(best[l], 3)})` })));
  const list = el("div", { id: "example-list" });
  box.append(el("div", { class: "controls" }, el("label", {}, "show ", pick)), list);
  function show() {
    list.replaceChildren();
    const shown = pick.value === "top" ? layers.slice(0, 3) : pick.value === "all" ? layers : [Number(pick.value)];
    for (const l of shown) {
      list.append(el("h3", { text: `layer ${l}` }), ...d.examples.filter((r) => r.layer === l).map(example));
    }
  }
  pick.addEventListener("change", show);
  show();
}

try {
  await header("latent");
  const suffix = layer === null ? "" : `?layer=${encodeURIComponent(layer)}`;
  const wait = el("p", { class: "note", id: "wait", text: "Loading the latent (the first page of a run loads its coder and tokenizer)…" });
  main.append(wait);
  const d = await api(`/api/runs/${encodeURIComponent(runName)}/latents/${latent}${suffix}`);
  wait.remove();
  const name = d.dictionary_layer === null ? `Latent ${latent}` : `Latent ${latent} of layer ${d.dictionary_layer}'s dictionary`;
  document.title = `mlsae explorer · ${runName} · ${name}`;
  main.append(el("h1", { text: name }));
  if (d.stats) {
    const s = d.stats;
    main.append(table(["dead", "n_tokens", "activation_rate", "mean_layer", "aggregated_variance", "per_token_variance", "variance_ratio",
      "n_layers_active", ...(s.trigger_layer !== null ? ["trigger_layer"] : [])], [s]));
  }
  profile(d);
  histogram(d);
  nearest(d);
  examples(d);
} catch (e) {
  document.getElementById("wait")?.remove();
  showError(e.message);
}
