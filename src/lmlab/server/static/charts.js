// The runs view's charts. uPlot (https://github.com/leeoniya/uPlot, MIT, vendored in static/vendor/ and loaded
// before this module) draws and zooms; this module turns runs' metrics into series and adds what TensorBoard
// and Weights & Biases users expect: smoothing with the raw curve faint, log y, x by step, tokens or wall time,
// a legend that tells train from validation, a readout of the points under the cursor, CSV and PNG export.
// Every chart keeps its own state (its uPlot instance and its data), so a readout never uses another chart's.

const uPlot = globalThis.uPlot;

// id: the element #chart-<id>; keys: [metric, role] drawn per run; group: the element shown or hidden with them
export const CHARTS = [
  { id: "loss", keys: [["loss", "train"], ["val_loss", "val"]], group: "train-charts" },
  { id: "bpb", keys: [["val_bpb", "val"]], group: "train-charts" },
  { id: "lr", keys: [["lr", ""]], group: "train-charts" },
  { id: "tps", keys: [["tokens_per_s", ""]], group: "train-charts" },
  { id: "reward", keys: [["reward", ""]], group: "sp-charts" },
  { id: "kl", keys: [["kl", ""]], group: "sp-charts" },
];
const X_KEYS = { step: "step", tokens: "tokens", time: "elapsed_s" };
export const WHOLE = Array.from({ length: 30 }, (_, i) => [1, 2, 5][i % 3] * 10 ** Math.floor(i / 3));

const saved = JSON.parse(localStorage.getItem("lmlab.charts") || "{}");
const view = { x: X_KEYS[saved.x] ? saved.x : "step", log: !!saved.log, smooth: Math.min(0.99, Math.max(0, +saved.smooth || 0)) };
const state = new Map();  // chart id -> {u, key, series, csv}: one per chart, never shared
let last = { runs: [], t: (k) => k };

export function fmt(v) {
  if (v == null || !Number.isFinite(v)) return "—";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return +(v / 1e3).toPrecision(3) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1e-3) return +v.toPrecision(4) + "";
  return v.toExponential(1).replace(".0e", "e");
}

const num = (v) => String(+v.toPrecision(5));  // the readout: 5 significant digits, no suffixes

// TensorBoard's scalar smoothing: an exponential moving average, debiased so the first points are not pulled
// towards 0 (tensorboard/plugins/scalar/vz_line_chart2/line-chart.ts, resmoothDataset).
export function ema(values, weight) {
  let acc = 0, n = 0;
  return values.map((v) => {
    if (!weight) return v;
    acc = acc * weight + (1 - weight) * v;
    n += 1;
    return acc / (1 - Math.pow(weight, n));
  });
}

const xLabel = (t, chart) => view.x === "step" ? t(chart.group === "sp-charts" ? "chart.iteration" : "chart.step")
  : t(view.x === "tokens" ? "chart.x_tokens" : "chart.x_time");

// x of a metrics line; text self-play logs its wall time as wall_s
const xOf = (m) => (view.x === "time" ? m.elapsed_s ?? m.wall_s : m[X_KEYS[view.x]]);

// runs: [{id, color, metrics}] -> one line per run and key: its x, raw y, smoothed y and metrics lines; a key's
// own colour (a third item) tells apart the lines of one run (the Tune tab's chosen, rejected and margin)
function seriesOf(chart, runs, t) {
  const out = [];
  for (const run of runs) for (const [key, role, color] of chart.keys) {
    const ms = run.metrics.filter((m) => m[key] != null && xOf(m) != null && (!view.log || m[key] > 0));
    if (!ms.length) continue;
    const ys = ms.map((m) => m[key]);
    out.push({ label: `#${run.id}${role ? " " + t("chart." + role) : ""}`, run: run.id, key, role, color: color ?? run.color,
               xs: ms.map(xOf), ys, smooth: ema(ys, view.smooth), rows: ms });
  }
  return out;
}

// uPlot wants one x array with every series aligned to it (null where a series has no point)
function align(series) {
  const xs = [...new Set(series.flatMap((s) => s.xs))].sort((a, b) => a - b), at = new Map(xs.map((x, i) => [x, i]));
  const col = (s, ys) => { const c = new Array(xs.length).fill(null); s.xs.forEach((x, i) => { c[at.get(x)] = ys[i]; }); return c; };
  const data = [xs];
  for (const s of series) {
    if (view.smooth) data.push(col(s, s.ys));  // the raw curve, faint
    data.push(col(s, view.smooth ? s.smooth : s.ys));
  }
  return data;
}

function uSeries(series) {
  const out = [{}];
  for (const s of series) {
    const dash = s.role === "val" ? [6, 4] : undefined, few = s.xs.length < 2 || s.role === "val";
    if (view.smooth) out.push({ label: s.label + " raw", stroke: s.color + "44", width: 1, dash, spanGaps: true, points: { show: false } });
    out.push({ label: s.label, stroke: s.color, width: 1.8, dash, spanGaps: true,
               points: { show: few, size: 6, fill: s.color, stroke: s.color } });
  }
  return out;
}

function svgEl(name, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// a sample of each line as drawn: validation dashed with a marker, train solid
function legend(series) {
  return series.map((s) => {
    const svg = svgEl("svg", { width: 24, height: 10, "aria-hidden": "true" });
    svg.append(svgEl("line", { x1: 1, x2: 23, y1: 5, y2: 5, stroke: s.color, "stroke-width": 2,
                               ...(s.role === "val" ? { "stroke-dasharray": "5 3" } : {}) }));
    if (s.role === "val") svg.append(svgEl("circle", { cx: 12, cy: 5, r: 3, fill: s.color }));
    const item = document.createElement("span");
    item.className = "lg";
    item.dataset.label = s.label;
    item.dataset.count = String(s.xs.length);
    item.append(svg, s.label);
    return item;
  });
}

// The points under the cursor: for each line the logged point nearest to it (uPlot's cursor.idxs skip nulls).
// With smoothing each line is two uPlot series, raw then smoothed.
function readout(u, st, box) {
  if (u.cursor.idx == null) { box.replaceChildren(); return; }
  const per = view.smooth ? 2 : 1;
  box.replaceChildren(...st.series.map((s, k) => {
    const col = (k + 1) * per, i = u.cursor.idxs[col], y = i == null ? null : u.data[col][i];
    const span = document.createElement("span");
    span.className = "ro";
    if (y == null) return span;
    const x = u.data[0][i], raw = view.smooth ? ` (${num(u.data[col - 1][i])})` : "";
    span.dataset.label = s.label; span.dataset.x = String(x); span.dataset.y = String(y);
    span.textContent = `${s.label} ${num(y)}${raw} @${num(x)}`;
    return span;
  }));
}

function csvOf(chart, series) {
  const rows = [["run", "metric", "step", "tokens", "elapsed_s", "value"]];
  for (const s of series) for (const m of s.rows) rows.push([s.run, s.key, m.step, m.tokens ?? "", m.elapsed_s ?? "", m[s.key]]);
  return rows.map((r) => r.join(",")).join("\n") + "\n";
}

function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function exportPng(chart, st) {
  const src = st.u.ctx.canvas;
  const title = document.querySelector(`#chart-${chart.id}`).closest("figure").querySelector("figcaption span").textContent;
  const c = document.createElement("canvas"), top = 44 * devicePixelRatio;
  c.width = src.width; c.height = src.height + top;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, c.width, c.height);
  ctx.font = `${13 * devicePixelRatio}px sans-serif`; ctx.fillStyle = "#111";
  ctx.fillText(title, 8 * devicePixelRatio, 16 * devicePixelRatio);
  let x = 8 * devicePixelRatio;
  for (const s of st.series) {  // the legend: line style per series, as on screen
    ctx.strokeStyle = s.color; ctx.lineWidth = 2 * devicePixelRatio;
    ctx.setLineDash(s.role === "val" ? [5 * devicePixelRatio, 3 * devicePixelRatio] : []);
    ctx.beginPath(); ctx.moveTo(x, 34 * devicePixelRatio); ctx.lineTo(x + 22 * devicePixelRatio, 34 * devicePixelRatio); ctx.stroke();
    ctx.fillStyle = "#111"; ctx.fillText(s.label, x + 26 * devicePixelRatio, 38 * devicePixelRatio);
    x += (34 + 7 * s.label.length) * devicePixelRatio;
  }
  ctx.drawImage(src, 0, top);
  c.toBlob((b) => download(fileName(chart, "png"), b), "image/png");
}

const fileName = (chart, ext) =>
  `lmlab-${chart.id}-runs-${[...new Set(state.get(chart.id).series.map((s) => s.run))].sort((a, b) => a - b).join("-")}.${ext}`;

function figureButtons(chart, t) {
  const cap = document.querySelector(`#chart-${chart.id}`).closest("figure").querySelector("figcaption");
  if (!cap.querySelector("span")) {  // wrap the caption's text, kept translatable by data-i18n
    const span = document.createElement("span");
    span.dataset.i18n = cap.dataset.i18n; span.textContent = cap.textContent;
    cap.removeAttribute("data-i18n");
    cap.replaceChildren(span);
    for (const kind of ["csv", "png"]) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "chart-export " + kind;
      b.onclick = () => {
        const st = state.get(chart.id);
        if (!st || !st.u) return;
        if (kind === "csv") download(fileName(chart, "csv"), new Blob([st.csv], { type: "text/csv" }));
        else exportPng(chart, st);
      };
      cap.append(b);
    }
  }
  for (const b of cap.querySelectorAll("button.chart-export")) {
    b.textContent = t(b.classList.contains("csv") ? "chart.csv" : "chart.png");
    b.disabled = !state.get(chart.id)?.u;
  }
}

// el and sid: the runs view's #chart-<id> by default; a run's page passes its own element (and state key)
function draw(chart, runs, t, el = document.querySelector(`#chart-${chart.id}`), sid = chart.id, emptyText = null) {
  const series = seriesOf(chart, runs, t), total = series.reduce((n, s) => n + s.xs.length, 0);
  el.dataset.points = String(total);
  let st = state.get(sid) || {};
  state.set(sid, st);
  const width = el.clientWidth, height = el.classList.contains("tall") ? 300 : 240;
  const key = JSON.stringify([series.map((s) => [s.label, s.color, s.role]), view, xLabel(t, chart)]);
  if (!total || !width) {
    if (st.u) st.u.destroy();
    st = { series: [] };
    el.uplot = null;
    state.set(sid, st);
    const empty = document.createElement("p");
    empty.className = "chart-empty";
    // runs with points, none of them on this x axis (self-play logs no tokens), or with y <= 0 on a log axis
    const other = runs.some((r) => r.metrics.some((m) => chart.keys.some(([k]) => m[k] != null)));
    empty.textContent = other ? t("chart.no_x") : emptyText ?? t("chart.empty");
    el.replaceChildren(empty);
    return;
  }
  const data = align(series);
  st.series = series;
  st.csv = csvOf(chart, series);
  if (st.u && st.key === key) {
    // resized (the window, the phone turned): the same plot at the new width keeps its zoom
    if (st.u.width !== width || st.u.height !== height) st.u.setSize({ width, height });
    // zoomed: the x range leaves out logged points (a single point's range is wider than the data, not zoomed)
    const x = st.u.scales.x, zoomed = st.full && (x.min > st.full[0] || x.max < st.full[1]);
    st.full = [data[0][0], data[0][data[0].length - 1]];
    st.u.setData(data, !zoomed);
    el.querySelectorAll(".lg").forEach((item, i) => { item.dataset.count = String(series[i].xs.length); });
    return;
  }
  if (st.u) st.u.destroy();
  el.replaceChildren();
  const legendBox = document.createElement("div"), plot = document.createElement("div"), ro = document.createElement("div");
  legendBox.className = "chart-legend"; ro.className = "chart-readout";
  legendBox.append(...legend(series));
  el.append(legendBox, plot, ro);
  const opts = {
    width, height, legend: { show: false },
    // a line has no point at most x (runs log at other steps, val only on evaluations): hover its nearest one
    // (by distance along x: uPlot without a proximity counts indices, which differ between runs)
    cursor: { drag: { x: true, y: false }, hover: { skip: [null], prox: 1e9 } },
    scales: { x: { time: false, range: (u, lo, hi) => (lo === hi ? [lo - 1, hi + 1] : [lo, hi]) },
              y: { distr: view.log ? 3 : 1 } },
    axes: [{ label: xLabel(t, chart), values: (u, vals) => vals.map(fmt), size: 40, labelSize: 16,
             ...(view.x === "time" ? {} : { incrs: WHOLE }) },  // steps and tokens are whole numbers
           { values: (u, vals) => vals.map(fmt), size: 60 }],
    series: uSeries(series),
    hooks: { setCursor: [(u) => readout(u, state.get(sid), ro)] },
  };
  st.key = key;
  st.full = [data[0][0], data[0][data[0].length - 1]];
  const u = st.u = el.uplot = new uPlot(opts, data, plot);  // el.uplot: for the browser tests
  // uPlot follows the mouse only: a finger put on the plot and drawn along it (a phone) moves the cursor, so the
  // readout shows the points under it (.u-over's touch-action lets vertical drags scroll the page)
  const follow = (e) => {
    const r = u.over.getBoundingClientRect(), p = e.touches[0];
    if (p) u.setCursor({ left: p.clientX - r.left, top: p.clientY - r.top });
  };
  for (const type of ["touchstart", "touchmove"]) u.over.addEventListener(type, follow, { passive: true });
}

function controls(t) {
  const box = document.querySelector("#chart-controls");
  if (!box) return;
  if (!box.childElementCount) {
    box.innerHTML = `<label><span data-c="chart.x"></span> <select id="chart-x">
        <option value="step"></option><option value="tokens"></option><option value="time"></option></select></label>
      <label><input type="checkbox" id="chart-log"> <span data-c="chart.log"></span></label>
      <label><span data-c="chart.smooth"></span> <input type="range" id="chart-smooth" min="0" max="0.99" step="0.01">
        <output id="chart-smooth-value"></output></label>
      <button type="button" id="chart-reset"></button>`;
    const save = () => { localStorage.setItem("lmlab.charts", JSON.stringify(view)); drawCharts(last.runs, last.t); };
    box.querySelector("#chart-x").onchange = (e) => { view.x = e.target.value; save(); };
    box.querySelector("#chart-log").onchange = (e) => { view.log = e.target.checked; save(); };
    box.querySelector("#chart-smooth").oninput = (e) => { view.smooth = +e.target.value; save(); };
    box.querySelector("#chart-reset").onclick = resetZoom;
  }
  for (const s of box.querySelectorAll("[data-c]")) s.textContent = t(s.dataset.c);
  const opts = box.querySelectorAll("#chart-x option");
  opts[0].textContent = t("chart.step"); opts[1].textContent = t("chart.x_tokens"); opts[2].textContent = t("chart.x_time");
  box.querySelector("#chart-x").value = view.x;
  box.querySelector("#chart-log").checked = view.log;
  box.querySelector("#chart-smooth").value = String(view.smooth);
  box.querySelector("#chart-smooth-value").textContent = view.smooth.toFixed(2);
  box.querySelector("#chart-reset").textContent = t("chart.reset");
}

export function resetZoom() {
  for (const st of state.values()) if (st.u) st.u.setData(st.u.data, true);
}

// runs: [{id, kind, color, metrics: [metrics line, ...]}] in the order they were selected; empty: what a chart
// without points says (a selected run's phase while it prepares)
export function drawCharts(runs, t, empty = null) {
  last = { runs, t };
  controls(t);
  const kinds = new Set(runs.map((r) => r.kind));
  // shown before drawing: a chart is drawn at its element's width
  document.querySelector("#sp-charts").hidden = !kinds.has("selfplay");
  document.querySelector("#train-charts").hidden = kinds.has("selfplay") && !kinds.has("train");
  for (const chart of CHARTS) {
    draw(chart, runs.filter((r) => (r.kind === "selfplay") === (chart.group === "sp-charts")), t, undefined, chart.id, empty);
    figureButtons(chart, t);
  }
}

// One chart (an id of CHARTS, or a chart of the same shape) of the given runs into `el`, with its own state: a
// run's page (runpage.js), the Tune tab (tune.js).
export function drawChartInto(el, id, runs, t, empty = null) {
  draw(typeof id === "string" ? CHARTS.find((c) => c.id === id) : id, runs, t, el, el, empty);
}
