// The Evaluate tab: models on tasks, or a training run's checkpoints, as a job of the server's supervisor
// (POST /api/v1/runs/eval starts `lmlab eval` or `lmlab compare` in a process of its own: closing the tab stops
// nothing, Cancel does), its status from the runs list that app.js refreshes, and its results
// (GET /api/v1/runs/ID/eval): per model and task the metrics with their 95% bootstrap intervals, the
// comparison's deltas with their paired-bootstrap intervals and the items that flipped, a run's trajectory
// drawn with uPlot (vendored, as charts.js uses it), and the comparison's report.html.

import { WHOLE } from "/static/charts.js";
import { keepFocus, runErrorText } from "/static/ux.js";

// from app.js: { S, t, h, api, withToken, statusLabel, refreshRuns, deleteRun, runAction, toast, fmtLoss, ACTIVE,
// COLORS }
let A = null;
const E = { tasks: [], current: null, results: new Map(), sigs: {}, chart: null };
const MAX_MODELS = 8;  // schemas.MAX_EVAL_MODELS
const $ = (s) => document.querySelector(s);
const f4 = (v) => A.fmtLoss(v);
const signed = (v) => (v > 0 ? "+" : "") + v.toFixed(4);

// what an evaluation scores, in a line: "tiny vs rand · fables-mc" or "#3 checkpoints · fables-mc"
export function evalName(r) {
  const p = r.params, what = p.run ? A.t("ev.of_run", { id: p.run, model: p.models[0] }) : p.models.join(" · ");
  return `${what} — ${p.tasks.map((x) => x.replace(/^tasks\//, "")).join(", ")}`;
}

// the report of `lmlab compare`: an evaluation of several models writes one
export const hasReport = (r) => r.kind === "eval" && !r.params.run && r.params.models.length > 1;

export function initEvaluate(app) {
  A = app;
  const { h } = A, i = (key, text, attrs = {}) => h(attrs.tag || "span", { "data-i18n": key, text, ...attrs, tag: null });
  $("#tab-evaluate").append(
    i("ev.title", "Evaluate models", { tag: "h2" }),
    h("form", { id: "ev-form", class: "card form-grid", autocomplete: "off" },
      h("label", {}, i("ev.mode", "Score"), h("select", { id: "ev-mode" },
        i("ev.mode_models", "models on tasks", { tag: "option", value: "models" }),
        i("ev.mode_run", "a training run's checkpoints (trajectory)", { tag: "option", value: "run" }))),
      h("label", { id: "ev-run-box", hidden: true }, i("ev.run", "Training run"), h("select", { id: "ev-run" })),
      h("fieldset", { class: "wide", id: "ev-models-box" }, i("ev.models", "Models (the first one checked is the baseline of the comparison)", { tag: "legend" }),
        h("div", { id: "ev-models", class: "checks" })),
      h("fieldset", { class: "wide" }, i("ev.tasks", "Tasks", { tag: "legend" }), h("div", { id: "ev-tasks", class: "checks" })),
      h("div", { class: "actions wide" }, i("ev.start", "Start evaluation", { tag: "button", type: "submit", id: "ev-start" }),
        h("span", { id: "ev-msg", class: "msg" }))),
    i("ev.note", "", { tag: "p", class: "muted" }),
    h("table", { id: "ev-table", class: "grid" }, h("thead", {}, h("tr", {}, h("th", { text: "#" }), i("ev.what", "What", { tag: "th" }),
      i("col.status", "Status", { tag: "th" }), h("th", {}, i("runs.actions", "Actions", { class: "sr-only" })))), h("tbody")),
    i("ev.empty", "No evaluations yet.", { tag: "p", id: "ev-empty", class: "muted" }),
    h("div", { id: "ev-detail", class: "card", hidden: true }));
  $("#ev-mode").addEventListener("change", () => renderForm(true));
  $("#ev-form").addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
}

// the tab is shown: the task list again (task files may have been added to the workspace's tasks/ folder)
export async function showEvaluate() {
  try { E.tasks = await A.api("GET", "/api/v1/eval/tasks"); } catch (e) { A.toast(e.message, true); }
  renderEvaluate();
}

function setMsg(text, ok = true) {
  $("#ev-msg").textContent = text;
  $("#ev-msg").className = "msg " + (ok ? "ok" : "bad");
}

// checkboxes (value, label, disabled reason) redrawn only when the choices change, keeping what was checked;
// the first time choices are offered, `preferred` (else the first) is checked
function checks(box, key, items, preferred) {
  const sig = JSON.stringify(items) + A.t("ev.items");
  if (E.sigs[key] === sig) return;
  const first = !box.querySelector("input"), kept = new Set([...box.querySelectorAll("input:checked")].map((x) => x.value));
  E.sigs[key] = sig;
  box.replaceChildren(...items.map(([value, text, problem]) => A.h("label", { class: "check", title: problem || null },
    A.h("input", { type: "checkbox", value, disabled: !!problem, checked: !problem && (first ? value === (preferred ?? items[0][0]) : kept.has(value)) }),
    " " + text, problem ? A.h("span", { class: "muted", text: ` — ${problem}` }) : null)));
}

function renderForm(modeChanged = false) {
  const { S, t } = A, byRun = $("#ev-mode").value === "run";
  $("#ev-run-box").hidden = !byRun;
  $("#ev-models-box").hidden = byRun;
  const trained = S.models.filter((m) => m.trained);
  checks($("#ev-models"), "models", trained.map((m) => [m.name, m.name]));
  if (!trained.length) $("#ev-models").replaceChildren(A.h("p", { class: "muted", text: t("gen.no_models") }));
  checks($("#ev-tasks"), "tasks", E.tasks.map((x) => [x.id, x.problem ? x.id : `${x.name} · ${x.kind} · ${t("ev.items", { n: x.items })}` +
    (x.source === "workspace" ? ` · ${x.id}` : ""), x.problem]), E.tasks.find((x) => x.kind === "multiple_choice")?.id);
  // a trajectory reads a stopped training run's checkpoints
  const runs = S.runs.filter((r) => r.kind === "train" && !A.ACTIVE.has(r.status) && r.checkpoint_step != null), sel = $("#ev-run"), keep = sel.value;
  sel.replaceChildren(...runs.map((r) => A.h("option", { value: r.id, text: t("ev.run_option", { id: r.id, model: r.model, step: r.checkpoint_step }) })));
  if (runs.some((r) => String(r.id) === keep)) sel.value = keep;
  $("#ev-start").disabled = byRun ? !runs.length : !trained.length;
  if (modeChanged) setMsg(byRun && !runs.length ? t("ev.no_runs") : "", !(byRun && !runs.length));
}

async function start() {
  const { t } = A, picked = (box) => [...$(box).querySelectorAll("input:checked")].map((x) => x.value);
  const tasks = picked("#ev-tasks"), models = picked("#ev-models"), byRun = $("#ev-mode").value === "run";
  if (!tasks.length) return setMsg("✗ " + t("ev.pick_task"), false);
  if (!byRun && !models.length) return setMsg("✗ " + t("ev.pick_model"), false);
  if (!byRun && models.length > MAX_MODELS) return setMsg("✗ " + t("ev.too_many", { n: MAX_MODELS }), false);
  try {
    const run = await A.api("POST", "/api/v1/runs/eval", byRun ? { run: +$("#ev-run").value, tasks } : { models, tasks });
    setMsg(A.startedOrQueued(run, "ev.started"));
    E.current = run.id;
    await A.refreshRuns();
  } catch (e) { setMsg("✗ " + e.message, false); }
}

export function renderEvaluate() {
  if (!A || !$("#ev-form")) return;
  const { S, t, h } = A;
  renderForm();
  const runs = S.runs.filter((r) => r.kind === "eval");
  // redrawn on every refresh of the runs: the focused control keeps its focus (ux.keepFocus)
  keepFocus($("#ev-table tbody"), runs.map((r) => h("tr", { "data-run": r.id, "data-status": r.status, class: r.id === E.current ? "selected" : "" },
    h("td", {}, h("a", { href: `#run/${r.id}`, class: "run-link", text: `#${r.id}` })), h("td", { text: evalName(r) }),
    h("td", {}, h("span", { class: "badge " + r.status, text: A.statusLabel(r) })),
    h("td", {},
      h("button", { type: "button", class: "view", text: t("lab.view"), onclick: () => { E.current = r.id; renderEvaluate(); } }), " ",
      A.ACTIVE.has(r.status) && !r.cancel_requested ? h("button", { type: "button", class: "danger cancel", text: t("runs.cancel"), onclick: () => A.runAction(r.id, "cancel") }) : null, " ",
      r.can_restart ? h("button", { type: "button", class: "restart", text: t("runs.restart"), onclick: () => A.runAction(r.id, "restart") }) : null, " ",
      !A.ACTIVE.has(r.status) ? h("button", { type: "button", class: "danger", text: t("runs.delete"), onclick: () => A.deleteRun(r.id) }) : null))), "data-run");
  $("#ev-empty").hidden = runs.length > 0;
  $("#ev-table").hidden = !runs.length;
  renderDetail(runs.find((r) => r.id === E.current));
}

// the results of a completed run (written when it completes): fetched once; a failed fetch is not retried on
// every refresh (it would repeat its message every 2 s)
function results(r) {
  if (r.status !== "completed") return null;
  if (!E.results.has(r.id)) {
    E.results.set(r.id, null);
    A.api("GET", `/api/v1/runs/${r.id}/eval`).then((data) => { E.results.set(r.id, data); renderEvaluate(); })
      .catch((e) => A.toast(e.message, true));
  }
  return E.results.get(r.id);
}

// tabindex: on a narrow screen a table scrolls sideways (app.css), and must scroll from the keyboard too
// (axe-core's scrollable-region-focusable)
function table(id, heads, rows) {
  const h = A.h;
  return h("table", { id, class: "grid", tabindex: "0" }, h("thead", {}, h("tr", {}, ...heads.map((k) => h("th", { text: A.t(k) })))), h("tbody", {}, ...rows));
}

const interval = (lo, hi, sign = f4) => (lo == null ? "—" : `[${sign(lo)}, ${sign(hi)}]`);

function renderDetail(r) {
  const box = $("#ev-detail"), { t, h } = A;
  box.hidden = !r;
  if (!r) return;
  const d = results(r);
  // drawn again only when something shown changed (the runs list is refreshed every 2 s): the flipped items
  // stay open, and the chart is drawn at the tab's width once it is visible
  const sig = JSON.stringify([r.id, r.status, r.error, A.ACTIVE.has(r.status) && Math.round(r.elapsed_s || 0), d != null,
                              t("ev.results"), $("#tab-evaluate").clientWidth]);
  if (box.dataset.sig === sig) return;
  box.dataset.sig = sig;
  const parts = [h("h3", { id: "ev-head", text: `#${r.id} · ${evalName(r)} · ${A.statusLabel(r)}` })];
  if (r.error) parts.push(h("div", { class: "error", text: runErrorText(r.error) }));
  if (A.ACTIVE.has(r.status)) parts.push(h("p", { class: "muted", id: "ev-progress", text: t("ev.in_progress", { s: Math.round(r.elapsed_s || 0) }) }));
  if (d && d.results.length) {
    parts.push(h("h4", { text: t("ev.results") }), table("ev-results", ["ev.model", "ev.task", "ev.metric", "ev.value", "ev.interval", "ev.n"],
      d.results.flatMap((m) => m.tasks.flatMap((x) => Object.entries(x.metrics).map(([name, v]) =>
        h("tr", { "data-model": m.model, "data-task": x.task, "data-metric": name },
          h("td", { text: m.model }), h("td", { text: x.task }), h("td", { text: name }),
          h("td", { class: "num value", "data-value": String(v.value), text: f4(v.value) }),
          h("td", { class: "num", text: interval(v.low, v.high) }), h("td", { class: "num", text: x.n })))))));
  }
  const c = d && d.comparison;
  if (c) {
    parts.push(h("h4", { text: t("ev.comparison", { base: c.base }) }), table("ev-compare", ["ev.task", "ev.metric", "ev.model", "ev.base", "ev.value", "ev.delta", "ev.interval"],
      c.rows.map((x) => h("tr", { "data-model": x.model, "data-task": x.task, "data-metric": x.metric },
        h("td", { text: x.task }), h("td", { text: x.metric }), h("td", { text: x.model }), h("td", { class: "num", text: f4(x.base) }),
        h("td", { class: "num", text: f4(x.value) }),
        // the interval above or below 0: the difference holds on resampled items
        h("td", { class: "num delta " + (x.low > 0 ? "ok" : x.high < 0 ? "bad" : ""), "data-value": String(x.delta), text: signed(x.delta) }),
        h("td", { class: "num", text: interval(x.low, x.high, signed) })))));
    parts.push(h("details", { id: "ev-flips" }, h("summary", { text: t("ev.flips", { n: c.flips.length }) }),
      table("ev-flips-table", ["ev.task", "ev.item", "ev.model", "ev.change"], c.flips.slice(0, 200).map((f) =>
        h("tr", {}, h("td", { text: f.task }), h("td", { class: "num", text: f.item }), h("td", { text: f.model }), h("td", { text: `${f.metric} ${f.from} → ${f.to}` }))))));
  }
  if (d && d.report) parts.push(h("p", {}, h("a", { id: "ev-report", href: A.withToken(`/api/v1/runs/${r.id}/report`), target: "_blank", rel: "noopener", text: t("ev.report") })));
  if (d && d.trajectory) {
    const el = h("div", { id: "ev-chart", class: "chart", role: "img", "aria-label": t("ev.trajectory", { id: d.trajectory_of }) });
    parts.push(h("figure", { class: "chart-box" }, h("figcaption", { text: t("ev.trajectory", { id: d.trajectory_of }) }), el));
    parts.push(table("ev-trajectory", ["ev.step", "ev.task", "ev.metric", "ev.value"], d.trajectory.map((p) =>
      h("tr", {}, h("td", { class: "num", text: p.step }), h("td", { text: p.task }), h("td", { text: p.metric }), h("td", { class: "num", "data-value": String(p.value), text: f4(p.value) })))));
    box.replaceChildren(...parts);
    drawTrajectory(el, d.trajectory);
    return;
  }
  if (r.status === "completed" && !d) parts.push(h("p", { class: "muted", text: t("rp.loading") }));
  box.replaceChildren(...parts);
}

// metric against step, one line per task and metric, with uPlot's own legend (its values follow the cursor)
function drawTrajectory(el, points) {
  if (E.chart) { E.chart.destroy(); E.chart = null; }
  if (!el.clientWidth) return;  // the tab is hidden: drawn when it is shown
  const names = [...new Set(points.map((p) => `${p.task} ${p.metric}`))], steps = [...new Set(points.map((p) => p.step))].sort((a, b) => a - b);
  const at = new Map(points.map((p) => [`${p.task} ${p.metric}@${p.step}`, p.value]));
  const data = [steps, ...names.map((n) => steps.map((s) => at.get(`${n}@${s}`) ?? null))];
  E.chart = new globalThis.uPlot({
    width: el.clientWidth, height: 240, scales: { x: { time: false } },
    series: [{ label: A.t("chart.step") }, ...names.map((n, i) => ({ label: n, stroke: A.COLORS[i % A.COLORS.length], width: 2, points: { show: true, size: 6 } }))],
    axes: [{ label: A.t("chart.step"), incrs: WHOLE }, {}],  // steps are whole numbers
  }, data, el);
}
