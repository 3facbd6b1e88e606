// A run's overview: its evaluation per layer (and the other served runs' beside it), the drift
// plot, the layer-distribution heatmap and the latent table (sorted, filtered, paged in the URL).
import { heatmap, lines } from "./charts.js";
import { api, el, fmt, header, latentLink, query, runName, showError, table } from "./common.js";

const main = document.getElementById("main");
const EVAL_COLUMNS = ["layer", "fvu", "fvu_standardized", "mse", "l0", "dead_fraction", "delta_ce", "kl", "loss_recovered_zero"];
const FILTERS = [["mean_layer", "mean layer"], ["layer_variance", "layer variance"], ["variance_ratio", "variance ratio"], ["activation_rate", "activation rate"]];
const SORTS = ["latent", "mean_layer", "layer_variance", "per_token_variance", "variance_ratio", "activation_rate", "n_tokens", "n_layers_active"];

function section(title, id) {
  const box = el("section", { id });
  box.append(el("h2", { text: title }));
  main.append(box);
  return box;
}

function evaluation(data) {
  const box = section("Evaluation per layer", "evaluation");
  if (!data.eval) {
    box.append(el("p", { class: "note", text: `No evaluation yet: run \`mlsae eval ${data.run.folder} --data TEXT\`.` }));
    return;
  }
  const cols = EVAL_COLUMNS.filter((c) => c in data.eval[0]);
  box.append(table(cols, data.eval));
  if (data.compare.length) {
    box.append(el("h2", { text: "Side by side with the other served runs" }));
    const runs = [{ run: runName, eval: data.eval }, ...data.compare];
    const metrics = ["fvu", "l0", "delta_ce"].filter((m) => runs.every((r) => m in r.eval[0]));
    const cols = ["layer", ...metrics.flatMap((m) => runs.map((r) => `${m} · ${r.run}`))];
    const rows = data.eval.map((row, i) => {
      const out = { layer: row.layer };
      for (const m of metrics) for (const r of runs) out[`${m} · ${r.run}`] = r.eval[i] ? r.eval[i][m] : null;
      return out;
    });
    const t = table(cols, rows);
    t.id = "compare";
    box.append(t);
  }
  if (data.not_compared.length) {
    box.append(el("p", { class: "note", text: `Not side by side: ${data.not_compared.map((r) => `${r.run} (${r.why})`).join("; ")}.` }));
  }
}

function drift(data) {
  const box = section("Residual-stream drift", "drift");
  if (!data.drift) {
    box.append(el("p", { class: "note", text: "No drift table: analyse the run." }));
    return;
  }
  const series = [false, true].map((centred) => {
    const rows = data.drift.filter((r) => r.centred === centred);
    return { name: centred ? "mean-centred" : "raw", points: rows.map((r) => [r.layer, r.mean]), band: rows.map((r) => [r.layer, r.p10, r.p90]) };
  }).filter((s) => s.points.length);
  const chart = el("div", { id: "drift-chart" });
  box.append(el("p", { class: "note", text: "Cosine similarity of the residual vectors of adjacent layers (l, l+1) at the same token; band: 10th to 90th percentile." }), chart);
  lines(chart, series, { xLabel: "layer l", yLabel: "cosine" });
}

function distribution(data, reload) {
  const box = section("Layer distribution of the latents", "distribution");
  const h = data.heatmap;
  if (!h || !h.rows.length) {
    box.append(el("p", { class: "note", text: h ? "Every latent is dead in the analysed tokens." : "No layer-distribution table: analyse the run." }));
    return;
  }
  const chart = el("div", { id: "heatmap-chart" });
  box.append(el("p", { class: "note", text: `Each column: ${h.latents_per_row} live latent(s), sorted by mean layer (${h.n_live.toLocaleString("en")} live); ` +
    "colour: activation at the layer relative to the latent's peak layer. Click a column to list its latents." }), chart);
  heatmap(chart, h.rows, {
    transpose: true, rowLabels: h.layers.map(String), xLabel: "live latents by mean layer", yLabel: "layer", height: Math.max(150, h.layers.length * 10),
    tip: (i, j, v) => `layer ${h.layers[i]}, mean layer ${fmt(h.mean_layer_lo[j], 3)}–${fmt(h.mean_layer_hi[j], 3)}: ${fmt(v, 3)}`,
    onClick: (i, j) => reload({ mean_layer_min: h.mean_layer_lo[j], mean_layer_max: h.mean_layer_hi[j], offset: 0, sort: "mean_layer", descending: "false" }),
  });
}

function latentTable(data) {
  const run = data.run;
  const box = section("Latents", "latents");
  if (!run.analysed) {
    box.append(el("p", { class: "note", text: `No analysis tables yet: run \`mlsae analyze ${run.folder} --data TEXT\` to list the latents.` }));
    return () => {};
  }
  const state = Object.fromEntries(query.entries());
  const controls = el("div", { class: "controls" });
  const sort = el("select", { id: "sort" }, ...SORTS.concat(run.latent_space === "joint" ? ["trigger_layer"] : [])
    .concat(run.latent_space === "per_layer" ? ["dictionary_layer"] : []).map((s) => el("option", { value: s, text: s })));
  const desc = el("input", { type: "checkbox", id: "descending" });
  const live = el("input", { type: "checkbox", id: "live_only" });
  controls.append(el("label", {}, "sort ", sort), el("label", {}, desc, " descending"), el("label", {}, live, " live only"));
  const inputs = {};
  for (const [key, label] of FILTERS) {
    inputs[`${key}_min`] = el("input", { type: "number", step: "any", id: `${key}_min`, placeholder: "min" });
    inputs[`${key}_max`] = el("input", { type: "number", step: "any", id: `${key}_max`, placeholder: "max" });
    controls.append(el("label", {}, `${label} `, inputs[`${key}_min`], " – ", inputs[`${key}_max`]));
  }
  const extra = run.latent_space === "joint" ? "trigger_layer" : run.latent_space === "per_layer" ? "dictionary_layer" : null;
  if (extra) {
    inputs[extra] = el("select", { id: extra }, el("option", { value: "", text: "any" }), ...run.layers.map((l) => el("option", { value: l, text: l })));
    controls.append(el("label", {}, `${extra.replace("_", " ")} `, inputs[extra]));
  }
  const apply = el("button", { text: "apply", id: "apply" });
  controls.append(apply);
  const info = el("span", { class: "note", id: "page-info" });
  const prev = el("button", { text: "◀ previous", id: "prev" });
  const next = el("button", { text: "next ▶", id: "next" });
  const holder = el("div", { id: "latent-table" });
  box.append(controls, holder, el("div", { class: "pager" }, prev, info, next));

  function fill() {
    sort.value = state.sort || "latent";
    desc.checked = state.descending === "true";
    live.checked = state.live_only === "true";
    for (const [k, input] of Object.entries(inputs)) input.value = state[k] ?? "";
  }

  async function load(changes = {}) {
    Object.assign(state, changes);
    for (const [k, v] of Object.entries(state)) if (v === "" || v === null || v === undefined) delete state[k];
    fill();
    const params = new URLSearchParams({ limit: 50, ...state });
    const search = new URLSearchParams(state).toString();
    history.replaceState(null, "", search ? `${location.pathname}?${search}` : location.pathname);
    try {
      const page = await api(`/api/runs/${encodeURIComponent(runName)}/latents?${params}`);
      const cols = ["latent", ...(run.latent_space === "per_layer" ? ["dictionary_layer"] : []), "activation_rate", "mean_layer", "layer_variance",
        "per_token_variance", "variance_ratio", "n_layers_active", ...(run.latent_space === "joint" ? ["trigger_layer"] : [])];
      const t = table(cols, page.rows, { latent: (v, r) => latentLink(runName, v, r.dictionary_layer) });
      t.querySelectorAll("th").forEach((th) => {
        if (!SORTS.includes(th.textContent) && !["trigger_layer", "dictionary_layer"].includes(th.textContent)) return;
        th.classList.add("sortable");
        if (th.textContent === (state.sort || "latent")) th.classList.add("sorted");
        th.addEventListener("click", () => load({ sort: th.textContent, descending: String(state.sort === th.textContent && state.descending !== "true"), offset: 0 }));
      });
      holder.replaceChildren(t);
      const offset = page.offset;
      info.textContent = page.total ? ` ${(offset + 1).toLocaleString("en")}–${Math.min(offset + page.limit, page.total).toLocaleString("en")} of ${page.total.toLocaleString("en")} ` : " no latent matches ";
      prev.disabled = offset === 0;
      next.disabled = offset + page.limit >= page.total;
      prev.onclick = () => load({ offset: Math.max(0, offset - page.limit) });
      next.onclick = () => load({ offset: offset + page.limit });
    } catch (e) {
      showError(e.message);
    }
  }

  apply.addEventListener("click", () => {
    const changes = { sort: sort.value, descending: String(desc.checked), live_only: String(live.checked), offset: 0 };
    for (const [k, input] of Object.entries(inputs)) changes[k] = input.value;
    load(changes);
  });
  sort.addEventListener("change", () => apply.click());
  load();
  return load;
}

try {
  await header("overview");
  const data = await api(`/api/runs/${encodeURIComponent(runName)}/overview`);
  document.title = `mlsae explorer · ${runName}`;
  main.append(el("h1", { text: `${runName}: overview` }));
  if (data.summary) {
    const lay = data.summary.layers || {};
    main.append(el("p", { class: "note", id: "headline", text:
      `Analysed on ${fmt(data.summary.n_tokens)} tokens: ${fmt(lay.n_live)} live latents of ${fmt(lay.n_latents)}; variance ratio ` +
      `aggregated/per-token ${fmt(lay.variance_ratio)}; mean layers active per token ${fmt(lay.mean_layers_active_per_token)}.` }));
  }
  evaluation(data);
  drift(data);
  let reload = () => {};
  distribution(data, (changes) => reload(changes));
  reload = latentTable(data);
} catch (e) {
  showError(e.message);
}
