// Small SVG charts drawn in the browser: a heatmap, lines with a band, and bars.
// Each function empties `el` and draws into it; marks carry a class the tests look for.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function frame(el, width, height) {
  el.replaceChildren();
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", class: "chart", role: "img" }, el);
}

function title(node, text) {
  svg("title", {}, node).textContent = text;
}

// A colour from white (0) to dark red (1).
export function heat(v) {
  const t = Math.max(0, Math.min(1, v));
  const r = Math.round(255 - 80 * t), g = Math.round(250 - 215 * t), b = Math.round(240 - 205 * t);
  return `rgb(${r},${g},${b})`;
}

function ticks(lo, hi, n = 5, integer = false) {
  if (!(hi > lo)) return [lo];
  if (integer && hi - lo <= n * 2) return Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(+v.toPrecision(6));
  return out;
}

function axes(g, x0, y0, w, h, xs, ys, fx, fy, labels) {
  svg("line", { x1: x0, y1: y0 + h, x2: x0 + w, y2: y0 + h, class: "axis" }, g);
  svg("line", { x1: x0, y1: y0, x2: x0, y2: y0 + h, class: "axis" }, g);
  for (const v of xs) {
    const t = svg("text", { x: fx(v), y: y0 + h + 14, "text-anchor": "middle", class: "tick" }, g);
    t.textContent = v;
  }
  for (const v of ys) {
    const t = svg("text", { x: x0 - 4, y: fy(v) + 4, "text-anchor": "end", class: "tick" }, g);
    t.textContent = Number.isInteger(v) && Math.abs(v) < 1e7 ? v.toLocaleString("en")
      : Math.abs(v) >= 1e7 || (v !== 0 && Math.abs(v) < 1e-2) ? v.toExponential(0) : v;
  }
  if (labels.x) svg("text", { x: x0 + w / 2, y: y0 + h + 30, "text-anchor": "middle", class: "label" }, g).textContent = labels.x;
  if (labels.y) {
    const t = svg("text", { x: 12, y: y0 + h / 2, "text-anchor": "middle", class: "label", transform: `rotate(-90 12 ${y0 + h / 2})` }, g);
    t.textContent = labels.y;
  }
}

// rows: array of arrays of values in [0, 1] (or any, scaled by max); rowLabels/colLabels: text per row/column.
// Rows are drawn top to bottom unless `columnsAreRows` (then each row of data is a column: latents along x).
export function heatmap(el, rows, { rowLabels = [], colLabels = [], transpose = false, onClick = null, tip = null,
                                    xLabel = "", yLabel = "", height = null } = {}) {
  const nr = transpose ? (rows[0] || []).length : rows.length;
  const nc = transpose ? rows.length : (rows[0] || []).length;
  const value = (i, j) => (transpose ? rows[j][i] : rows[i][j]);
  const left = 70, top = 8, right = 8, bottom = 40;
  const width = 900, h = height || Math.max(120, Math.min(560, nr * 18));
  const s = frame(el, width, h + top + bottom);
  let max = 0;
  for (let i = 0; i < nr; i++) for (let j = 0; j < nc; j++) max = Math.max(max, value(i, j) || 0);
  const cw = (width - left - right) / Math.max(nc, 1), ch = h / Math.max(nr, 1);
  const g = svg("g", {}, s);
  for (let i = 0; i < nr; i++) {
    for (let j = 0; j < nc; j++) {
      const v = value(i, j) || 0;
      const r = svg("rect", { x: left + j * cw, y: top + i * ch, width: cw + 0.5, height: ch + 0.5, fill: heat(max ? v / max : 0), class: "cell" }, g);
      if (tip) title(r, tip(i, j, v));
      if (onClick) { r.style.cursor = "pointer"; r.addEventListener("click", () => onClick(i, j, v)); }
    }
  }
  const every = (n, room) => Math.max(1, Math.ceil(n / room));
  const rs = every(nr, h / 12), cs = every(nc, (width - left) / 28);
  rowLabels.forEach((text, i) => {
    if (i % rs) return;
    const t = svg("text", { x: left - 4, y: top + (i + 0.5) * ch + 4, "text-anchor": "end", class: "tick" }, g);
    t.textContent = text;
  });
  colLabels.forEach((text, j) => {
    if (j % cs) return;
    const t = svg("text", { x: left + (j + 0.5) * cw, y: top + h + 14, "text-anchor": "middle", class: "tick" }, g);
    t.textContent = text;
  });
  if (xLabel) svg("text", { x: left + (width - left) / 2, y: top + h + 32, "text-anchor": "middle", class: "label" }, g).textContent = xLabel;
  if (yLabel) {
    const t = svg("text", { x: 12, y: top + h / 2, "text-anchor": "middle", class: "label", transform: `rotate(-90 12 ${top + h / 2})` }, g);
    t.textContent = yLabel;
  }
  return s;
}

// series: [{name, points: [[x, y], ...], band: [[x, lo, hi], ...]?}]
export function lines(el, series, { xLabel = "", yLabel = "" } = {}) {
  const width = 900, height = 300, left = 60, top = 10, w = width - left - 130, h = height - top - 45;
  const s = frame(el, width, height);
  const all = series.flatMap((se) => [...se.points.map((p) => p.slice(0, 2)), ...(se.band || []).flatMap((b) => [[b[0], b[1]], [b[0], b[2]]])]);
  if (!all.length) return s;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const fx = (x) => left + (x1 > x0 ? ((x - x0) / (x1 - x0)) * w : w / 2);
  const fy = (y) => top + h - (y1 > y0 ? ((y - y0) / (y1 - y0)) * h : h / 2);
  const g = svg("g", {}, s);
  const integerX = xs.every(Number.isInteger);
  const xt = ticks(x0, x1, 10, integerX).filter((v) => !integerX || Number.isInteger(v));
  axes(g, left, top, w, h, xt, ticks(y0, y1), fx, fy, { x: xLabel, y: yLabel });
  series.forEach((se, k) => {
    const colour = ["#b2182b", "#2166ac", "#1b7837", "#762a83"][k % 4];
    if (se.band && se.band.length) {
      const pts = [...se.band.map((b) => `${fx(b[0])},${fy(b[2])}`), ...se.band.slice().reverse().map((b) => `${fx(b[0])},${fy(b[1])}`)];
      svg("polygon", { points: pts.join(" "), fill: colour, opacity: 0.15, class: "band" }, g);
    }
    svg("polyline", { points: se.points.map((p) => `${fx(p[0])},${fy(p[1])}`).join(" "), fill: "none", stroke: colour, "stroke-width": 2, class: "line" }, g);
    se.points.forEach((p) => title(svg("circle", { cx: fx(p[0]), cy: fy(p[1]), r: 3, fill: colour, class: "point" }, g), `${se.name}: ${p[0]} -> ${(+p[1]).toFixed(4)}`));
    svg("rect", { x: left + w + 14, y: top + 6 + k * 18, width: 12, height: 12, fill: colour }, g);
    svg("text", { x: left + w + 30, y: top + 16 + k * 18, class: "tick" }, g).textContent = se.name;
  });
  return s;
}

// groups: [{name, values: [...]}] drawn as grouped bars over `labels`.
export function bars(el, labels, groups, { xLabel = "", yLabel = "", onClick = null } = {}) {
  const width = 900, height = 260, left = 60, top = 10, w = width - left - 130, h = height - top - 45;
  const s = frame(el, width, height);
  const max = Math.max(0, ...groups.flatMap((g) => g.values.map((v) => v || 0)));
  const bw = w / Math.max(labels.length, 1), inner = (bw * 0.85) / Math.max(groups.length, 1);
  const fy = (y) => top + h - (max > 0 ? (y / max) * h : 0);
  const g = svg("g", {}, s);
  axes(g, left, top, w, h, [], ticks(0, max), () => 0, fy, { x: xLabel, y: yLabel });
  const every = Math.max(1, Math.ceil(labels.length / 30));
  labels.forEach((text, i) => {
    groups.forEach((gr, k) => {
      const v = gr.values[i] || 0;
      const colour = ["#b2182b", "#2166ac", "#1b7837"][k % 3];
      const r = svg("rect", { x: left + i * bw + bw * 0.075 + k * inner, y: fy(v), width: Math.max(inner - 1, 1), height: top + h - fy(v), fill: colour, class: "bar" }, g);
      title(r, `${gr.name} at ${text}: ${(+v).toPrecision(4)}`);
      if (onClick) { r.style.cursor = "pointer"; r.addEventListener("click", () => onClick(i)); }
    });
    if (i % every === 0) svg("text", { x: left + (i + 0.5) * bw, y: top + h + 14, "text-anchor": "middle", class: "tick" }, g).textContent = text;
  });
  if (groups.length > 1) groups.forEach((gr, k) => {
    svg("rect", { x: left + w + 14, y: top + 6 + k * 18, width: 12, height: 12, fill: ["#b2182b", "#2166ac", "#1b7837"][k % 3] }, g);
    svg("text", { x: left + w + 30, y: top + 16 + k * 18, class: "tick" }, g).textContent = gr.name;
  });
  return s;
}
