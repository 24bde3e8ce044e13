// The Data tab: one book at a time, the data lab's tools on its stored text (routers/data.py; the same functions
// as `lmlab data inspect | dedup | filter | contamination`): what it holds (language, duplicates, tokens for a
// model, tokens per parameter, the epoch advisor), its duplicate paragraphs as clusters that open to show the
// shingles their members share, what the quality filters would remove and why (receipts), which items of an
// evaluation task it contains, and how far the embeddings of the runs trained on it drifted (their drift.json:
// drift over the steps with weight decay's share, each token's drift against its count, the most volatile).

import { drawChartInto, fmt } from "/static/charts.js";

let A = null;  // app.js: { S, t, h, api, fmtNum, toast, COLORS }
const D = { tasks: null, results: {}, lang: null, driftRun: null };  // the last answer of each card, drawn again on a language change
const $ = (s) => document.querySelector(s);
const pct = (v) => (Math.round(v * 1000) / 10).toString() + "%";

export function initData(app) {
  A = app;
  const { h, t } = A, i = (key, attrs = {}) => h(attrs.tag || "span", { "data-i18n": key, text: t(key), ...attrs, tag: null });
  const field = (key, control, attrs = {}) => h("label", attrs, i(key), control);
  const card = (id, title, ...body) => h("section", { class: "card", id, "aria-labelledby": id + "-h" }, i(title, { tag: "h3", id: id + "-h" }), ...body);
  $("#tab-data").append(
    i("data.title", { tag: "h2" }), i("data.intro", { tag: "p", class: "muted" }),
    h("div", { class: "card form-grid" },
      field("data.book", h("select", { id: "dt-book", onchange: () => { D.results = {}; draw(); } })),
      field("data.model", h("select", { id: "dt-model" })),
      field("data.planned", h("input", { id: "dt-planned", type: "number", min: 1, placeholder: "1000000" }))),
    card("dt-overview", "data.overview", h("div", { class: "actions" }, i("data.look", { tag: "button", type: "button", id: "dt-overview-go", onclick: () => run("overview") })), h("div", { class: "dt-out" })),
    card("dt-dups", "data.dups", i("data.dups_note", { tag: "p", class: "muted" }),
      h("div", { class: "actions" }, i("data.find", { tag: "button", type: "button", id: "dt-dups-go", onclick: () => run("duplicates") })), h("div", { class: "dt-out" })),
    card("dt-filters", "data.filters", i("data.filters_note", { tag: "p", class: "muted" }),
      h("div", { class: "checks" }, ...["gopher", "c4", "fineweb"].map((f) => h("label", { class: "check" }, h("input", { type: "checkbox", value: f, checked: true }), " " + f)),
        field("data.lang", h("input", { id: "dt-lang", placeholder: "ru", size: 6, maxlength: "20" })),
        h("label", { class: "check" }, h("input", { type: "checkbox", id: "dt-per-paragraph" }), " ", i("data.per_paragraph"))),
      h("div", { class: "actions" }, i("data.check", { tag: "button", type: "button", id: "dt-filters-go", onclick: () => run("filters") })), h("div", { class: "dt-out" })),
    card("dt-contam", "data.contam", i("data.contam_note", { tag: "p", class: "muted" }),
      h("div", { class: "form-grid" }, field("data.task", h("select", { id: "dt-task" })), field("data.n", h("input", { id: "dt-n", type: "number", min: 1, max: 100, value: 13 }))),
      h("div", { class: "actions" }, i("data.check", { tag: "button", type: "button", id: "dt-contam-go", onclick: () => run("contamination") })), h("div", { class: "dt-out" })),
    card("dt-drift", "data.drift", i("data.drift_note", { tag: "p", class: "muted" }),
      h("div", { class: "actions" }, i("data.show", { tag: "button", type: "button", id: "dt-drift-go", onclick: () => run("drift") })), h("div", { class: "dt-out" })));
}

// the drift charts are drawn at their box's width: drawn again when the window's width changes
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (D.results.drift && !$("#tab-data").hidden) drawDrift(D.results.drift); }, 150);
});

export async function showData() {
  if (!D.tasks) {
    try { D.tasks = (await A.api("GET", "/api/v1/eval/tasks")).filter((x) => !x.problem); } catch (e) { A.toast(e.message, true); }
  }
  renderData();
}

function options(sel, items, empty) {
  const keep = sel.value, sig = JSON.stringify([items, empty]);
  if (sel.dataset.sig === sig) return;
  sel.replaceChildren(...(empty ? [A.h("option", { value: "", text: empty })] : []), ...items.map(([v, text]) => A.h("option", { value: v, text })));
  sel.dataset.sig = sig;
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

export function renderData() {
  if (!A || !$("#dt-book")) return;
  const { S, t } = A;
  options($("#dt-book"), S.books.map((b) => [b.name, b.name]));
  options($("#dt-model"), S.models.filter((m) => m.trained).map((m) => [m.name, m.name]), t("data.no_model"));
  options($("#dt-task"), (D.tasks || []).map((x) => [x.id, `${x.name} (${x.items})`]));
  for (const b of document.querySelectorAll("#tab-data button")) b.disabled = !S.books.length;
  if (D.lang !== t("data.title")) { D.lang = t("data.title"); draw(); }  // drawn again in a new language only:
}                                                                       // an opened cluster stays open

const PATHS = { overview: "overview", duplicates: "duplicates", filters: "filters", contamination: "contamination", drift: "drift" };
const OUT = { overview: "#dt-overview .dt-out", duplicates: "#dt-dups .dt-out", filters: "#dt-filters .dt-out", contamination: "#dt-contam .dt-out",
  drift: "#dt-drift .dt-out" };

async function run(card) {
  const book = $("#dt-book").value, q = new URLSearchParams(), out = $(OUT[card]);
  if (!book) return;
  if (card === "overview") {
    if ($("#dt-model").value) q.set("model", $("#dt-model").value);
    if ($("#dt-planned").value) q.set("planned_tokens", $("#dt-planned").value);
  } else if (card === "filters") {
    const names = [...document.querySelectorAll("#dt-filters .checks input:checked:not(#dt-per-paragraph)")].map((x) => x.value);
    if ($("#dt-lang").value.trim()) names.push("lang=" + $("#dt-lang").value.trim());
    if (!names.length) return message(out, A.t("data.pick_filter"), false);
    q.set("spec", names.join(","));
    if ($("#dt-per-paragraph").checked) q.set("level", "paragraph");
  } else if (card === "contamination") {
    q.set("task", $("#dt-task").value);
    q.set("n", $("#dt-n").value || "13");
  }
  message(out, A.t("data.working"));
  try {
    D.results[card] = await A.api("GET", `/api/v1/books/${encodeURIComponent(book)}/data/${PATHS[card]}?${q}`);
    draw(card);  // this card only: another card's opened cluster or picked run stays as it is
  } catch (e) { delete D.results[card]; message(out, "✗ " + e.message, false); }
}

function message(out, text, ok = true) {
  out.replaceChildren(A.h("p", { class: "msg " + (ok ? "" : "bad"), role: "status", text }));
}

const table = (id, head, rows) => A.h("table", { id, class: "grid" }, A.h("thead", {}, A.h("tr", {}, ...head.map((x) => A.h("th", { text: x })))),
  A.h("tbody", {}, ...rows.map((r) => A.h("tr", {}, ...r.map((c) => (c instanceof Node ? A.h("td", {}, c) : A.h("td", { text: c })))))));

// every card that has a result (a new language), or only the card `only`
function draw(only = null) {
  const { t, h } = A, R = D.results, want = (card) => R[card] && (only == null || only === card), fact = (key, text, id) => h("div", { class: "fact", "data-fact": id }, h("dt", { text: t(key) }), h("dd", { text }));
  for (const card of Object.keys(OUT)) if (!R[card] && $(OUT[card])?.querySelector("table, dl")) $(OUT[card]).replaceChildren();
  if (want("overview")) {
    const o = R.overview;
    $(OUT.overview).replaceChildren(h("dl", { class: "facts", id: "dt-facts" },
      fact("data.characters", A.fmtNum(o.characters), "characters"),
      fact("data.encoding", o.encoding || "—", "encoding"),
      fact("data.language", `${o.language} (${pct(o.language_score)})`, "language"),
      fact("data.paragraphs", A.fmtNum(o.paragraphs), "paragraphs"),
      fact("data.dup_paragraphs", `${A.fmtNum(o.duplicate_paragraphs)} (${pct(o.duplicate_character_share)} ${t("data.of_text")})`, "dup_paragraphs"),
      ...(o.tokens != null ? [fact("data.tokens", o.tokens_estimated ? t("data.tokens_estimate", { tokens: A.fmtNum(o.tokens), chars: A.fmtNum(o.tokens_counted_characters) }) : A.fmtNum(o.tokens), "tokens"),
        fact("data.tpp", t("data.tpp_value", { tpp: o.tokens_per_parameter.toFixed(2), model: o.model, chin: A.fmtNum(o.chinchilla_tokens) }), "tpp")] : [])),
      ...(o.epoch_advice ? [h("p", { id: "dt-epochs", class: o.epoch_advice.warning ? "bad" : "ok",
        text: o.epoch_advice.warning || t("data.epochs_ok", { epochs: o.epoch_advice.epochs.toFixed(2) }) })] : []),
      ...(o.paragraph_histogram ? [table("dt-hist", [t("data.hist_tokens"), t("data.hist_paragraphs")],
        o.paragraph_histogram.map((b) => [`${b.min}–${b.max - 1}`, A.fmtNum(b.documents)]))] : []));
  }
  if (want("duplicates")) {
    const d = R.duplicates, s = d.stats;
    $(OUT.duplicates).replaceChildren(h("p", { id: "dt-dups-summary", text: t("data.dups_summary", { units: A.fmtNum(s.units), removed: A.fmtNum(s.removed),
      exact: A.fmtNum(s.exact_duplicates), clusters: A.fmtNum(s.clusters), near: A.fmtNum(s.near_clusters) }) }),
    ...d.clusters.map((c) => h("details", { class: "dt-cluster", "data-cluster": c.id },
      h("summary", { text: `#${c.id} · ${t("data.kind_" + c.kind)} · ${t("data.members", { n: c.members.length })} · ${t("data.shared", { n: c.shared_shingles })} — ${c.members[0].preview}` }),
      table(null, [t("data.kept"), t("data.where"), "Jaccard", t("data.text")], c.members.map((m) => [m.kept ? "✓" : "✗", `${m.start}–${m.end}`, m.jaccard_with_first.toFixed(2), m.preview])),
      c.shared_examples.length ? h("p", { class: "muted", text: t("data.shared_examples") + " " + c.shared_examples.map((x) => `«${x}»`).join(" · ") }) : null)));
  }
  if (want("filters")) {
    const f = R.filters;
    $(OUT.filters).replaceChildren(h("p", { id: "dt-filters-summary", class: f.kept ? "ok" : "bad", text: !f.kept ? t("data.filters_removed")
      : f.level === "paragraph" ? t("data.filters_kept_paragraphs", { kept: A.fmtNum(f.characters_kept), total: A.fmtNum(f.characters_in),
        pkept: A.fmtNum(f.paragraphs_kept), ptotal: A.fmtNum(f.paragraphs_in) })
        : t("data.filters_kept", { kept: A.fmtNum(f.characters_kept), total: A.fmtNum(f.characters_in) }) }),
    table("dt-receipts", [t("data.filter"), t("data.removed_doc"), t("data.removed_chars"), t("data.rules")], f.filters.map((r) => [r.name,
      r.documents_removed ? t("data.yes") : "—", A.fmtNum(r.characters_removed),
      [...Object.entries(r.removed_by_rule), ...Object.entries(r.lines_removed_by_rule).map(([k, v]) => [k + " " + t("data.lines"), v])].map(([k, v]) => `${k}: ${v}`).join(", ") || "—"])),
    ...f.filters.flatMap((r) => r.examples.map((e) => h("p", { class: "muted dt-why", text: `${r.name}: ${e.rule} = ${e.value} (${e.limit})` }))));
  }
  if (want("drift")) drawDrift(R.drift);
  if (want("contamination")) {
    const c = R.contamination;
    $(OUT.contamination).replaceChildren(h("p", { id: "dt-contam-summary", class: c.contaminated ? "bad" : "ok", text: t("data.contam_summary", { n: c.n, dirty: c.contaminated, items: c.items, clean: c.clean }) }),
      ...(c.per_item.length ? [table("dt-contam-items", ["#", t("data.ngrams"), t("data.example"), t("data.text")],
        c.per_item.map((r) => [String(r.index), `${r.matched}/${r.ngrams} (${pct(r.overlap)})`, r.example, r.text]))] : []));
  }
}

// ---- drift of runs ---------------------------------------------------------------------------------------

const DRIFT_KEYS = [["drift/mean", "drift_mean", "#2563eb"], ["drift/max", "drift_max", "#dc2626"], ["drift/decay_only", "drift_decay", "#6b7280"]];

function drawDrift(res) {
  const { t, h } = A, out = $(OUT.drift);
  if (!res.runs.length) return message(out, t("data.drift_none"));
  const r = res.runs.find((x) => x.id === D.driftRun) || res.runs[res.runs.length - 1];
  D.driftRun = r.id;
  const pick = h("select", { id: "dt-drift-run", onchange: (e) => { D.driftRun = +e.target.value; drawDrift(res); } },
    ...res.runs.map((x) => h("option", { value: x.id, text: `#${x.id} · ${x.model} · ${A.t("status." + x.status)}` })));
  pick.value = String(r.id);
  const decay = r.records.length ? r.records[r.records.length - 1].decay_only : null;
  const steps = h("div", { class: "chart", id: "dt-drift-steps", role: "img", "aria-label": t("data.drift_steps") });
  const dots = h("div", { class: "chart", id: "dt-drift-scatter", role: "img", "aria-label": t("data.drift_scatter") });
  out.replaceChildren(...[h("label", {}, h("span", { text: t("data.drift_run") }), pick),
    h("p", { id: "dt-drift-summary", text: t("data.drift_summary", { id: r.id, model: r.model, step: r.step, mean: fmt(r.mean), vocab: A.fmtNum(r.vocab_size) }) }),
    r.unseen_tokens ? h("p", { id: "dt-drift-unseen", text: t("data.drift_unseen", { n: A.fmtNum(r.unseen_tokens), mean: fmt(r.unseen_mean), decay: fmt(decay) }) }) : null,
    r.tied_embeddings ? h("p", { class: "muted", text: t("data.drift_tied") }) : null,
    h("figure", { class: "chart-box" }, h("figcaption", { text: t("data.drift_steps") }), steps),
    r.points.count ? h("figure", { class: "chart-box" }, h("figcaption", { text: t("data.drift_scatter") }), dots) : null,
    h("h4", { text: t("data.drift_volatile") }),
    table("dt-drift-volatile", [t("data.drift_token"), t("data.drift_value"), t("data.drift_times")],
      r.volatile.map((v) => [JSON.stringify(v.token ?? `#${v.id}`), fmt(v.drift), v.count == null ? "—" : A.fmtNum(v.count)]))].filter(Boolean));
  const keys = [...DRIFT_KEYS, ...r.probes.map((p, k) => [`drift/probe${k}`, "drift_probe", A.COLORS[(k + 2) % A.COLORS.length]])];
  const metrics = r.records.map((m) => ({ step: m.step, tokens: m.tokens, elapsed_s: m.elapsed_s, "drift/mean": m.mean, "drift/max": m.max,
    "drift/decay_only": m.decay_only, ...Object.fromEntries(m.probes.map((v, k) => [`drift/probe${k}`, v])) }));
  drawChartInto(steps, { id: "dt-drift-steps", keys, group: "train-charts" }, [{ id: r.id, kind: "train", color: "#2563eb", metrics }], t);
  if (r.points.count) scatter(dots, r.points, r.tied_embeddings ? null : decay);
}

// every token as a point: x its count in the training data + 1 (log axis), y its drift; the dashed line is
// what weight decay alone gives a row that gets no gradient
function scatter(el, pts, decay) {
  const { t } = A, order = pts.count.map((c, i) => [c + 1, pts.drift[i]]).sort((a, b) => a[0] - b[0]);
  const xs = order.map((p) => p[0]), data = [xs, order.map((p) => p[1]), xs.map(() => decay)];
  el.dataset.points = String(xs.length);
  if (el.uplot) el.uplot.destroy();
  el.replaceChildren();
  el.uplot = new globalThis.uPlot({
    width: el.clientWidth || 600, height: 260, legend: { show: false }, cursor: { drag: { x: true, y: true } },
    scales: { x: { time: false, distr: 3 } },
    axes: [{ label: t("data.drift_count") }, { label: t("data.drift_y"), size: 60 }],
    series: [{}, { stroke: "#2563eb", paths: () => null, points: { show: true, size: 4, fill: "#2563eb66", stroke: "#2563eb" } },
      { stroke: "#6b7280", width: 1.5, dash: [6, 4], points: { show: false } }],
  }, data, el);
}
