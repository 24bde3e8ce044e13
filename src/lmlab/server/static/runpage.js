// The run page (#run/ID: settings, data, phase, timing, load, samples over time, self-play completions, an
// experiment's progress, clone and the command line) and the runs table's sorting, filtering, settings diff
// and its refresh that keeps keyboard focus. app.js hands over its helpers once (initRunPage).

import { runErrorText } from "/static/ux.js";

let A = null;  // app.js: { S, t, h, api, fmtNum, fmtBytes, fmtLoss, statusLabel, labName, subscribe, runChart, showTab, toast }
const $ = (sel, root = document) => root.querySelector(sel);
const ACTIVE = new Set(["queued", "running"]);

export function initRunPage(app) {
  A = app;
  setupTable();
  setInterval(() => { if (!$("#tab-run").hidden) refreshPage(); }, 2000);
}

// ---- small formatting --------------------------------------------------------------------------------

export function fmtDuration(s) {
  if (s == null) return "—";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60, pad = (x) => String(x).padStart(2, "0");
  return h ? A.t("dur.h", { h, m: pad(m) }) : m ? A.t("dur.m", { m, s: pad(sec) }) : A.t("dur.s", { s: sec });
}

const value = (v) => (v == null ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v));

// What the charts say while a run has no points yet: its phase (or its place in the queue), never "select a
// run" for a run that is selected: a finished one logged none, or is of a kind that logs none (quantization).
const METRIC_KINDS = new Set(["train", "selfplay", "tune"]);
export function chartEmpty(ids) {
  const known = (id) => A.S.runs.find((r) => r.id === id) || (page.data && page.data.run && page.data.run.id === id ? page.data.run : null);
  const runs = ids.map(known).filter(Boolean);
  const active = runs.find((r) => ACTIVE.has(r.status));
  if (!active) return A.t(!runs.length ? "chart.empty" : runs.some((r) => METRIC_KINDS.has(r.kind)) ? "chart.none_logged" : "chart.no_metrics");
  return active.status === "queued" ? A.t("rp.phase.queued") : A.t("rp.phase." + (active.phase || "starting"));
}

// ---- the runs table: sort, filter, compare, refresh in place ------------------------------------------

const view = { sort: "id", dir: -1, kind: "", status: "", text: "" };
const COLUMNS = [null, "id", "model", "status", "progress", "loss", "val", "tps", "reward", null];
const ALIASES = { loss: "last_loss", val: "best_val_loss", val_loss: "best_val_loss", tps: "tokens_per_s_mean",
                  steps: "max_steps", step: "current_step", reward: "last_reward", model: "model" };

function sortValue(r, key) {
  switch (key) {
    case "model": return (r.kind === "experiment" ? A.labName(r) : r.model).toLowerCase();
    case "progress": return r.progress;
    case "loss": return r.kind === "train" ? r.last_loss : null;
    case "val": return r.best_val_loss;
    case "tps": return r.tokens_per_s_mean;
    case "reward": return r.last_reward;
    default: return key.startsWith("p:") ? r.params[key.slice(2)] : r[key];  // p:NAME, a setting
  }
}

// a setting (params) or a result of a run by name (lr is the setting, not the latest learning rate)
function field(r, key) {
  if (r.params && key in r.params) return r.params[key];
  const k = ALIASES[key] || key;
  return k in r && typeof r[k] !== "object" ? r[k] : undefined;
}

const TERM = /^([a-z_]+)(>=|<=|!=|=|>|<)(.+)$/i;

// Words match the number, model, kind, status, books or experiment; `key OP value` (=, !=, <, <=, >, >=)
// compares a setting or result: lr<0.001 status=completed loss<2.5 batch_size=16.
export function matches(r, text) {
  for (const term of text.trim().toLowerCase().split(/\s+/).filter(Boolean)) {
    const m = term.match(TERM);
    if (m) {
      const got = field(r, m[1]);
      if (got == null) return false;
      const a = Number(got), b = Number(m[3]), numeric = !Number.isNaN(a) && !Number.isNaN(b) && typeof got !== "boolean";
      const x = numeric ? a : String(got).toLowerCase(), y = numeric ? b : m[3];
      const ok = { "=": x == y, "!=": x != y, "<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y }[m[2]];  // eslint-disable-line eqeqeq
      if (!ok) return false;
    } else {
      const hay = [`#${r.id}`, r.model, r.kind, r.status, ...(r.books || []), r.params.new_model, r.params.experiment, r.params.lab]
        .filter(Boolean).join(" ").toLowerCase();
      if (!hay.includes(term)) return false;
    }
  }
  return true;
}

export function tableRuns(runs) {
  for (const b of document.querySelectorAll("#runs-table thead button.sort"))
    b.parentElement.setAttribute("aria-sort", b.dataset.sort !== view.sort ? "none" : view.dir > 0 ? "ascending" : "descending");
  sortOptions(runs);
  const rows = runs.filter((r) => (!view.kind || r.kind === view.kind) && (!view.status || r.status === view.status) && matches(r, view.text));
  const cmp = (a, b) => {
    const x = sortValue(a, view.sort), y = sortValue(b, view.sort);
    if (x == null || y == null) return (x == null) - (y == null) || b.id - a.id;  // no value: last
    return (x < y ? -1 : x > y ? 1 : 0) * view.dir || b.id - a.id;
  };
  return rows.sort(cmp);
}

function setupTable() {
  const t = A.t, h = A.h, table = $("#runs-table");
  // sortable headers: a button in each (keyboard reachable), aria-sort on the header
  table.querySelectorAll("thead th").forEach((th, i) => {
    const key = COLUMNS[i];
    if (!key) return;
    const label = key === "tps" ? "rp.col_tps" : th.dataset.i18n;
    const b = h("button", { type: "button", class: "sort", "data-sort": key, "data-i18n": label || null, text: label ? t(label) : th.textContent });
    th.removeAttribute("data-i18n");
    th.replaceChildren(b);
    b.addEventListener("click", () => {  // the same column again reverses; another starts ascending
      view.dir = view.sort === key ? -view.dir : 1;
      view.sort = key;
      A.renderRuns();
    });
  });
  const kinds = ["", "train", "selfplay", "experiment", "eval", "quantize", "merge", "tune"], statuses = ["", "queued", "running", "completed", "failed", "interrupted", "cancelled"];
  const select = (id, label, options, name) => h("label", {}, h("span", { "data-i18n": label, text: t(label) }),
    h("select", { id, onchange: (e) => { view[name] = e.target.value; A.renderRuns(); } },
      ...options.map((o) => h("option", { value: o, "data-i18n": o ? (name === "kind" ? "rp.kind." + o : "status." + o) : "rp.all", text: t(o ? (name === "kind" ? "rp.kind." + o : "status." + o) : "rp.all") }))));
  const bar = h("div", { class: "runs-tools", id: "runs-tools" },
    select("runs-kind", "rp.filter_kind", kinds, "kind"), select("runs-status", "col.status", statuses, "status"),
    h("label", { class: "grow" }, h("span", { "data-i18n": "rp.filter", text: t("rp.filter") }),
      h("input", { id: "runs-filter", type: "search", placeholder: "lr<0.001 loss<3 tales", oninput: (e) => { view.text = e.target.value; A.renderRuns(); } })),
    h("label", {}, h("span", { "data-i18n": "rp.sort_by", text: t("rp.sort_by") }),
      h("select", { id: "runs-sort", onchange: (e) => { const [key, dir] = e.target.value.split(" "); view.sort = key; view.dir = +dir; A.renderRuns(); } })),
    h("button", { type: "button", id: "runs-compare-btn", class: "secondary", "data-i18n": "rp.compare", text: t("rp.compare"), onclick: () => { compareOpen = !compareOpen; renderCompare(); } }));
  table.before(bar);
  table.after(h("div", { id: "runs-compare", class: "card", hidden: true }));
}

// The sort select: the columns, the kind, and every setting any run has (ascending and descending each).
function sortOptions(runs) {
  const sel = $("#runs-sort");
  if (!sel) return;
  const keys = ["id", "kind", "model", "status", "progress", "loss", "val", "tps", "reward",
                ...[...new Set(runs.flatMap((r) => Object.keys(r.params)))].sort().map((k) => "p:" + k)];
  const label = (k) => (k.startsWith("p:") ? k.slice(2) : A.t("rp.sort." + k));
  const options = keys.flatMap((k) => [[`${k} 1`, `${label(k)} ↑`], [`${k} -1`, `${label(k)} ↓`]]);
  const sig = options.map((o) => o.join("=")).join("|");
  if (sel.dataset.sig !== sig) {  // rebuilt only when the choices change: an open select keeps its state
    sel.replaceChildren(...options.map(([v, text]) => A.h("option", { value: v, text })));
    sel.dataset.sig = sig;
  }
  sel.value = `${view.sort} ${view.dir}`;
}

// Rows are matched by run id; a row's attributes are updated and only its cells that changed are replaced,
// so a focused control in an unchanged cell keeps focus (a cell that changed gives its focus to the control
// of the same kind in the new cell).
export function patchRows(tbody, rows) {
  const active = document.activeElement, inside = active && tbody.contains(active) && active !== tbody;
  const spot = inside ? { run: active.closest("tr")?.dataset.run, tag: active.tagName, cls: active.className, text: active.textContent } : null;
  const old = new Map([...tbody.children].map((r) => [r.dataset.run, r]));
  rows.forEach((row, i) => {
    const prev = old.get(row.dataset.run);
    let keep = row;
    if (prev) {
      old.delete(row.dataset.run);
      for (const a of [...prev.attributes]) if (!row.hasAttribute(a.name)) prev.removeAttribute(a.name);
      for (const a of [...row.attributes]) if (prev.getAttribute(a.name) !== a.value) prev.setAttribute(a.name, a.value);
      const a = [...prev.children], b = [...row.children];
      if (a.length !== b.length) prev.replaceChildren(...b);
      else a.forEach((c, j) => { if (!c.isEqualNode(b[j])) c.replaceWith(b[j]); });
      keep = prev;
    }
    if (tbody.children[i] !== keep) tbody.insertBefore(keep, tbody.children[i] || null);
  });
  for (const r of old.values()) r.remove();
  if (!spot || document.activeElement === active) return;
  if (active.isConnected) { active.focus({ preventScroll: true }); return; }
  const tr = [...tbody.children].find((r) => r.dataset.run === spot.run);
  const twin = tr && [...tr.querySelectorAll(spot.tag)].find((e) => e.className === spot.cls && e.textContent === spot.text);
  if (twin) twin.focus({ preventScroll: true });
}

let compareOpen = false;

// The settings of a run as the diff compares them: what it was made from and every parameter.
const settingsOf = (r) => ({ kind: r.kind, model: r.model, books: (r.books || []).join(", "), init_from_trained: r.init_from_trained, ...r.params });

export function settingsDiff(runs) {
  const keys = [...new Set(runs.flatMap((r) => Object.keys(settingsOf(r))))].sort();
  return keys.filter((k) => new Set(runs.map((r) => value(settingsOf(r)[k]))).size > 1)
    .map((k) => [k, runs.map((r) => value(settingsOf(r)[k]))]);
}

export function renderCompare() {
  const box = $("#runs-compare"), S = A.S, t = A.t, h = A.h;
  const runs = [...S.selected].sort((a, b) => a - b).map((id) => S.runs.find((r) => r.id === id)).filter(Boolean);
  $("#runs-compare-btn").disabled = runs.length < 2;
  $("#runs-compare-btn").setAttribute("aria-expanded", String(compareOpen && runs.length >= 2));
  box.hidden = !compareOpen || runs.length < 2;
  if (box.hidden) return;
  const diff = settingsDiff(runs);
  const results = [["rp.res_loss", (r) => A.fmtLoss(r.kind === "train" ? r.last_loss : null)], ["rp.res_val", (r) => A.fmtLoss(r.best_val_loss)],
                   ["rp.col_tps", (r) => (r.tokens_per_s_mean == null ? "—" : A.fmtNum(Math.round(r.tokens_per_s_mean)))],
                   ["rp.elapsed", (r) => fmtDuration(r.elapsed_s)]];
  const next = h("div", {},
    h("h3", { text: t("rp.compare_title", { n: runs.length }) }),
    h("div", { class: "scroll-x" }, h("table", { class: "grid", id: "compare-table" },
      h("thead", {}, h("tr", {}, h("th", { text: t("rp.setting") }), ...runs.map((r) => h("th", { text: `#${r.id}` })))),
      h("tbody", {},
        ...(diff.length ? diff.map(([k, vals]) => h("tr", { "data-setting": k }, h("td", { text: k }), ...vals.map((v) => h("td", { text: v }))))
          : [h("tr", {}, h("td", { colspan: runs.length + 1, class: "muted", text: t("rp.same_settings") }))]),
        ...results.map(([key, f]) => h("tr", { class: "result" }, h("td", { text: t(key) }), ...runs.map((r) => h("td", { class: "num", text: f(r) }))))))));
  if (!box.firstChild || !box.firstChild.isEqualNode(next)) box.replaceChildren(next);
}

// ---- the run page -------------------------------------------------------------------------------------

let page = { id: null, data: null, charts: null, chartsPart: null, chartsSig: "" };

export function openRun(id) {
  if (page.id !== id) page = { id, data: null, charts: null, chartsPart: null, chartsSig: "" };
  A.subscribe(id);
  renderPage();
  refreshPage();
}

async function refreshPage() {
  const id = page.id;
  if (id == null) return;
  try {
    const data = await A.api("GET", `/api/v1/runs/${id}/overview`);
    if (page.id === id) { page.data = data; renderPage(); }
  } catch (e) {
    if (page.id === id) { page.data = { error: e.message }; renderPage(); }
  }
}

// New metrics (app.js's redraw): the page's facts (MFU) and charts follow them.
export function metricsChanged() {
  if (page.id != null && !$("#tab-run").hidden) renderPage();
}

// The run page's charts: drawn by app.js (runChart), whatever chart code it has.
function drawPageCharts() {
  if (!page.charts || $("#tab-run").hidden) return;
  for (const [key, el] of Object.entries(page.charts)) A.runChart(el, page.id, key, chartEmpty([page.id]));
}

function fact(label, text, id) {
  return A.h("div", { class: "fact", "data-fact": id }, A.h("dt", { text: A.t(label) }), A.h("dd", { text }));
}

function renderPage() {
  const root = $("#run-page"), S = A.S, t = A.t, h = A.h, d = page.data;
  const r = S.runs.find((x) => x.id === page.id) || (d && d.run);
  if (!r) {
    root.replaceChildren(h("p", { class: d && d.error ? "bad" : "muted", text: d && d.error ? d.error : t("rp.loading") }));
    page.charts = null;
    return;
  }
  const sp = r.kind === "selfplay", lab = ["experiment", "eval", "quantize", "merge"].includes(r.kind), load = d ? d.load : null;
  const name = sp || r.kind === "tune" ? `${r.model} → ${r.params.new_model}` : lab ? A.labName(r) : r.model;
  const phase = r.status === "running" ? t("rp.phase." + (r.phase || "starting")) : r.status === "queued" ? t("rp.phase.queued") : A.statusLabel(r);
  const sections = [];
  sections.push(h("div", { class: "rp-head", "data-part": "head" },
    h("h2", { id: "rp-title", text: t("rp.title", { id: r.id, name }) }),
    h("span", { class: "badge " + r.status, text: A.statusLabel(r) }), h("span", { class: "kind", text: t("rp.kind." + r.kind) }),
    h("span", { class: "grow" }),
    h("a", { href: "#runs", class: "back", text: t("rp.back") }),
    d && d.clone ? h("button", { type: "button", id: "rp-clone", onclick: () => cloneToForm(d.clone) , text: t("rp.clone") }) : null));
  if (r.error) sections.push(h("div", { class: "error", "data-part": "error", text: runErrorText(r.error) }));
  const facts = [
    fact("rp.phase", phase, "phase"),
    fact("col.progress", `${A.fmtNum(r.current_step)} / ${A.fmtNum(r.max_steps)}`, "steps"),
    fact("rp.elapsed", fmtDuration(r.elapsed_s), "elapsed"),
    fact("rp.eta", r.status === "running" ? fmtDuration(r.eta_s) : "—", "eta"),
  ];
  if (r.kind === "train") {
    const m = (S.metrics.get(r.id) || []).filter((x) => x.mfu != null).pop();
    facts.push(fact("rp.tps_mean", r.tokens_per_s_mean == null ? "—" : A.fmtNum(Math.round(r.tokens_per_s_mean)), "tps_mean"),
               fact("rp.tps_now", r.tokens_per_s == null ? "—" : A.fmtNum(Math.round(r.tokens_per_s)), "tps_now"),
               fact("rp.mfu", m ? (m.mfu * 100).toFixed(2) + " %" : "—", "mfu"),
               fact("col.loss", A.fmtLoss(r.last_loss), "loss"), fact("col.val_loss", A.fmtLoss(r.best_val_loss), "val"));
  }
  if (sp) facts.push(fact("col.reward", r.last_reward == null ? "—" : `${A.fmtLoss(r.last_reward)} · ${A.fmtLoss(r.last_kl)}`, "reward"));
  if (lab && d && d.trainings && d.trainings.started) facts.push(fact("rp.trainings", t("rp.trainings_n", d.trainings), "trainings"));
  if (load) facts.push(fact("rp.load", t("rp.load_v", { load: load.load_1m == null ? "—" : load.load_1m.toFixed(2), cpus: load.cpus,
    mem: load.memory_total_bytes ? A.fmtBytes(load.memory_total_bytes - load.memory_available_bytes) + " / " + A.fmtBytes(load.memory_total_bytes) : "—" }), "load"),
    fact("rp.rss", load.process_rss_bytes == null ? "—" : A.fmtBytes(load.process_rss_bytes), "rss"));
  sections.push(h("dl", { class: "facts card", "data-part": "facts" }, ...facts));
  // charts: made once per page (and language), drawn by app.js
  if (!lab) {
    const rl = sp || (r.kind === "tune" && r.params.method === "grpo");  // GRPO logs a reward and a KL too
    const keys = rl ? ["reward", "kl"] : ["loss", "tokens_per_s"], sig = keys.join() + A.t("rp.chart.loss");
    if (!page.charts || page.chartsSig !== sig) {
      page.charts = Object.fromEntries(keys.map((k) => [k, h("div", { class: "chart", role: "img", id: "rp-chart-" + k, "aria-label": t("rp.chart." + k) })]));
      page.chartsPart = h("div", { class: "charts rp-charts", "data-part": "charts" },
        ...keys.map((k) => h("figure", { class: "chart-box" }, h("figcaption", { text: t("rp.chart." + k) }), page.charts[k])));
      page.chartsSig = sig;
    }
    sections.push(page.chartsPart);
  } else page.charts = null;
  if (d && d.samples && d.samples.length) {
    sections.push(h("section", { class: "card", id: "rp-samples", "data-part": "samples" }, h("h3", { text: t("rp.samples") }),
      ...d.samples.slice().reverse().map((line) => h("div", { class: "sample", "data-step": line.step },
        h("div", { class: "muted", text: t("rp.at_step", { step: A.fmtNum(line.step) }) }),
        ...line.samples.map((s) => h("p", { class: "output" }, h("span", { class: "prompt-echo", text: s.prompt }), s.text))))));
  }
  if (d && d.completions && d.completions.length) {
    sections.push(h("section", { class: "card", id: "rp-completions", "data-part": "completions" }, h("h3", { text: t("rp.completions") }),
      h("div", { class: "scroll-x" }, h("table", { class: "grid" },
        h("thead", {}, h("tr", {}, h("th", { text: t("rp.iteration") }), h("th", { text: t("rp.reward") }), h("th", { text: "KL" }), h("th", { text: t("rp.completion") }))),
        h("tbody", {}, ...d.completions.slice().reverse().map((c) => h("tr", { "data-step": c.step },
          h("td", { class: "num", text: c.step }), h("td", { class: "num", text: A.fmtLoss(c.reward) }), h("td", { class: "num", text: A.fmtLoss(c.kl) }),
          h("td", { class: "output", text: c.sample }))))))));
  }
  if (d && d.config) {
    const c = d.config, st = c.data_stats || {};
    sections.push(h("section", { class: "card", id: "rp-data", "data-part": "data" }, h("h3", { text: t("rp.data") }),
      h("p", { text: `${t("runs.books")}: ${r.books.join(", ")}` + (st.tokens ? ` · ${t("rp.tokens_v", { tokens: A.fmtNum(st.tokens), train: A.fmtNum(st.train_tokens), val: A.fmtNum(st.val_tokens) })}` : "") })));
  }
  const settings = d && d.config ? { ...d.config.train, ...Object.fromEntries(Object.entries(d.config.model).map(([k, v]) => ["model." + k, v])) } : r.params;
  sections.push(h("section", { class: "card", id: "rp-settings", "data-part": "settings" }, h("h3", { text: t("rp.settings") }),
    h("dl", { class: "settings" }, ...Object.entries(settings).flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: value(v) })]))));
  if (d && d.command) {
    sections.push(h("section", { class: "card", id: "rp-command", "data-part": "command" }, h("h3", { text: t("rp.command") }),
      h("pre", { class: "preview", id: "rp-command-text", text: d.command }),
      h("button", { type: "button", class: "secondary", id: "rp-copy", text: t("rp.copy"), onclick: () => copyCommand(d.command) }),
      d.clone ? h("p", { class: "muted", text: t("rp.clone_note") }) : null));
  }
  if (d && d.log_tail && d.log_tail.length) {
    sections.push(h("section", { class: "card", id: "rp-log", "data-part": "log" }, h("h3", { text: lab ? t("rp.progress") : t("runs.log") }),
      h("pre", { class: "preview", tabindex: "0", text: d.log_tail.join("\n") })));
  }
  patchParts(root, sections);
  drawPageCharts();
}

// The clipboard API exists only in a secure context (https, or localhost): a server opened as http://HOST:PORT/
// from another machine has no navigator.clipboard. There the text is selected and copied the older way, or, where
// that is refused too, left selected for the user's own Ctrl+C.
function copyCommand(text) {
  if (window.isSecureContext && navigator.clipboard) {
    navigator.clipboard.writeText(text).then(() => A.toast(A.t("rp.copied")), selectCommand);
  } else selectCommand();
}

function selectCommand() {
  const range = document.createRange(), selection = getSelection();
  range.selectNodeContents($("#rp-command-text"));
  selection.removeAllRanges();
  selection.addRange(range);
  let copied = false;
  try { copied = document.execCommand("copy"); } catch { copied = false; }
  A.toast(A.t(copied ? "rp.copied" : "rp.copy_select"));
}

// the page's parts are replaced only where they changed (keyboard focus stays; the charts stay drawn)
function patchParts(root, parts) {
  const old = new Map([...root.children].map((c) => [c.dataset.part, c]));
  parts.forEach((p, i) => {
    const prev = old.get(p.dataset.part);
    let keep = p;
    if (prev && (prev === p || prev.isEqualNode(p))) keep = prev;
    else if (prev) prev.replaceWith(p);
    old.delete(p.dataset.part);
    if (root.children[i] !== keep) root.insertBefore(keep, root.children[i] || null);
  });
  for (const c of old.values()) c.remove();
}

// Fill the train form with a run's settings (those it has fields for) and go there.
export function cloneToForm(clone) {
  const model = $("#train-model");
  model.value = clone.model;
  model.dispatchEvent(new Event("change"));
  for (const box of document.querySelectorAll("#train-books input")) box.checked = clone.books.includes(box.value);
  for (const [k, v] of Object.entries(clone)) {
    const input = $("#t-" + k);
    if (!input || v == null) continue;
    if (input.type === "checkbox") input.checked = !!v;
    else { input.value = String(v); input.dispatchEvent(new Event("input", { bubbles: true })); }
  }
  A.showTab("train");
  A.toast(A.t("rp.cloned", { id: page.id }));
}
