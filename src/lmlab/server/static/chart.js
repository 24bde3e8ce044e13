// Hand-written SVG line charts: no library, no CDN. One function draws a whole chart from data, so a
// live update is just a redraw (a few thousand points render in well under a frame).

const NS = "http://www.w3.org/2000/svg";
let W = 640, H = 240;
const M = { left: 58, right: 14, top: 26, bottom: 30 };

function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// "Nice" tick values (1, 2, 5 x 10^k) covering [lo, hi] with about n ticks.
export function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}

export function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
  if (a >= 1e-2) return v.toFixed(3).replace(/\.?0+$/, "");
  return v.toExponential(1);
}

// series: [{label, color, dashed, points: [[x, y], ...]}]; empty: message shown instead.
export function drawChart(svg, { series, xLabel = "step", empty = "no data yet" }) {
  svg.replaceChildren();
  // draw in the element's own pixels, so text keeps its size whatever the layout width
  W = Math.max(320, Math.round(svg.clientWidth || 640));
  H = Math.max(160, Math.round(svg.clientHeight || 240));
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const live = series.filter((s) => s.points.length);
  const total = live.reduce((n, s) => n + s.points.length, 0);
  svg.dataset.points = String(total);
  if (!total) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = empty;
    return;
  }
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const s of live) for (const [x, y] of s.points) {
    if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
  }
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.06 || Math.abs(y0) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const px = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
  const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);

  for (const t of niceTicks(y0, y1, 5)) {
    el("line", { class: "grid-line", x1: M.left, x2: W - M.right, y1: py(t), y2: py(t) }, svg);
    el("text", { x: M.left - 6, y: py(t) + 4, "text-anchor": "end" }, svg).textContent = fmt(t);
  }
  for (const t of niceTicks(x0, x1, 6).filter(Number.isInteger)) {  // steps are whole numbers
    el("line", { class: "grid-line", x1: px(t), x2: px(t), y1: M.top, y2: H - M.bottom }, svg);
    el("text", { x: px(t), y: H - M.bottom + 15, "text-anchor": "middle" }, svg).textContent = fmt(t);
  }
  el("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }, svg);
  el("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }, svg);
  el("text", { x: W - M.right, y: H - 3, "text-anchor": "end" }, svg).textContent = xLabel;

  let lx = M.left;
  for (const s of live) {
    const d = s.points.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    const path = el("path", { class: "series" + (s.dashed ? " dashed" : ""), d, stroke: s.color }, svg);
    path.dataset.label = s.label;
    path.dataset.count = String(s.points.length);
    if (s.points.length === 1 || s.dashed) {
      for (const [x, y] of s.points) el("circle", { cx: px(x), cy: py(y), r: 2.5, fill: s.color }, svg);
    }
    el("rect", { x: lx, y: 8, width: 14, height: 3, fill: s.color }, svg);
    const label = el("text", { x: lx + 18, y: 13 }, svg);
    label.textContent = s.label;
    lx += 26 + 6.2 * s.label.length;
  }

  // hover read-out: the nearest logged step of each series
  const hover = el("g", { visibility: "hidden" }, svg);
  const vline = el("line", { class: "hover-line", y1: M.top, y2: H - M.bottom }, hover);
  const readout = el("text", { y: M.top + 12 }, hover);
  svg.onmousemove = (ev) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + ((ev.clientX - box.left) * (W / box.width) - M.left) / (W - M.left - M.right) * (x1 - x0);
    if (x < x0 || x > x1) { hover.setAttribute("visibility", "hidden"); return; }
    const parts = [];
    for (const s of live) {
      let best = s.points[0];
      for (const p of s.points) if (Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      parts.push(`${s.label} ${fmt(best[1])} @${best[0]}`);
    }
    const X = px(Math.min(x1, Math.max(x0, x)));
    vline.setAttribute("x1", X); vline.setAttribute("x2", X);
    readout.setAttribute("x", X > W / 2 ? X - 6 : X + 6);
    readout.setAttribute("text-anchor", X > W / 2 ? "end" : "start");
    readout.textContent = parts.join("  ·  ");
    hover.setAttribute("visibility", "visible");
  };
  svg.onmouseleave = () => hover.setAttribute("visibility", "hidden");
}
