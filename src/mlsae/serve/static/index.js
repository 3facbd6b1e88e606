// The served runs, each linked to its overview.
import { api, el, fmt, showError, table } from "./common.js";

try {
  const runs = await api("/api/runs");
  const main = document.getElementById("main");
  main.append(el("h1", { text: "Served runs" }), table(
    ["name", "arch", "model", "layers", "n_latents", "train_tokens", "evaluated", "analysed"],
    runs.map((r) => ({ ...r, layers: r.layers.length })),
    { name: (v) => el("a", { href: `/runs/${encodeURIComponent(v)}`, text: v, class: "run-link" }) },
  ));
} catch (e) {
  showError(e.message);
}
