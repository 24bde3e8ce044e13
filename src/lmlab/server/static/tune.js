// The Tune tab: fine-tuning a trained model (routers/tune.py). Datasets of JSONL (uploaded for a kind, checked by
// the server with the reader the runs use: a bad file is refused with the line that is wrong), a preview of what
// a model would be trained on (its tokens, the trained ones marked: the chat renderer's mask), and runs of
// `lmlab tune sft | dpo --loss L | grpo --task T` (LoRA optional) or `lmlab tune distill` (the model teaches a new
// student of a preset on books) as jobs of the server's supervisor, listed with cancel and resume, and charted live
// from the run's metrics stream (app.js subscribe): loss for SFT, chosen/rejected rewards, margin and accuracy for
// the preference losses, reward and KL for GRPO, the loss's two parts and the KL to the teacher for distillation.

import { drawChartInto } from "/static/charts.js";
import { keepFocus, runErrorText } from "/static/ux.js";

// from app.js: { S, t, h, api, apiHeaders, statusLabel, refreshRuns, refreshModels, deleteRun, runAction, toast,
// subscribe, fmtNum, fmtBytes, ACTIVE, COLORS }
let A = null;
const T = { options: null, datasets: [], current: null, preview: null, previewName: null, named: false, sigs: {} };
const $ = (s) => document.querySelector(s);
const KINDS = ["conversations", "prompt_completion", "pairs", "kto"];

// what each trainer writes to metrics.jsonl, a chart per line of this list (charts.js draws them)
// a run's charts: GRPO logs no KL when its kl_coef is 0 (no reference model is kept), so that chart is left out
const chartsOf = (r) => CHARTS[r.params.method].filter((c) => !(r.params.method === "grpo" && c.id === "tune-kl" && !r.params.kl_coef));
const CHARTS = {
  sft: [{ id: "tune-loss", key: "tune.chart_loss", keys: [["loss", "train"], ["val_loss", "val"]] }],
  dpo: [{ id: "tune-rewards", key: "tune.chart_rewards", keys: [["rewards_chosen", "chosen", "#16a34a"], ["rewards_rejected", "rejected", "#dc2626"], ["margin", "margin", "#2563eb"]] },
        { id: "tune-accuracy", key: "tune.chart_accuracy", keys: [["accuracy", ""]] },
        { id: "tune-kl", key: "tune.chart_drift", keys: [["kl", ""]] }],
  grpo: [{ id: "tune-reward", key: "tune.chart_reward", keys: [["reward", ""]] },
         { id: "tune-kl", key: "tune.chart_kl", keys: [["kl", ""]] }],
  // logits mode: the loss is (1 - alpha) x data + alpha x KD, both parts logged; val_kl at each evaluation
  distill: [{ id: "tune-loss", key: "tune.chart_loss", keys: [["loss", "train"], ["val_loss", "val"]] },
            { id: "tune-kd", key: "tune.chart_kd", keys: [["kd_loss", "kd", "#7c3aed"], ["ce_loss", "ce", "#0891b2"]] },
            { id: "tune-val-kl", key: "tune.chart_val_kl", keys: [["val_kl", ""]] }],
};

// the API field of inputs whose id does not end in it alone: a validation error names the field by its label (ux.js)
const API_FIELDS = { "tn-model": "model", "tn-new": "new_model", "tn-steps": "max_steps", "tn-batch": "batch_size", "tn-group": "group_size",
  "tn-prompts": "prompts_per_step", "tn-max-new": "max_new_tokens", "tn-kl": "kl_coef", "tn-alpha": "alpha",
  "tn-sft-weight": "sft_weight", "tn-lora-rank": "lora_rank", "tn-lora-alpha": "lora_alpha", "tn-lora-dropout": "lora_dropout",
  "tn-lora-targets": "lora_targets", "tn-lora-hard": "lora_hard_tokens", "tn-lora-new-tokens": "lora_new_tokens" };

// "base → base-chat · SFT on chats.jsonl" / "· IPO on pairs.jsonl" / "· GRPO, addition"
export function tuneName(r) {
  const p = r.params, t = A.t;
  const how = p.method === "grpo" ? t("tune.what_grpo", { task: t("tune.task_" + p.task) })
    : p.method === "distill" ? t("tune.what_distill", { preset: p.preset, books: (r.books || []).join(", ") })
    : t("tune.what_data", { method: (p.method === "dpo" ? p.loss : "sft").toUpperCase(), data: p.dataset });
  return `${r.model} → ${p.new_model} · ${how}${p.lora_rank ? " · LoRA r" + p.lora_rank : ""}`;
}

export function initTune(app) {
  A = app;
  const { h } = A, i = (key, attrs = {}) => h(attrs.tag || "span", { "data-i18n": key, text: A.t(key), ...attrs, tag: null });
  const field = (key, control, attrs = {}) => h("label", attrs, i(key), control);
  const num = (id, attrs) => h("input", { type: "number", id, ...attrs });
  $("#tab-tune").append(
    i("tune.title", { tag: "h2" }),
    i("tune.intro", { tag: "p", class: "muted" }),
    // datasets
    h("form", { id: "tn-upload", class: "card form-grid", autocomplete: "off" },
      i("tune.datasets", { tag: "h3", class: "wide" }),
      field("tune.kind", h("select", { id: "tn-kind" }, ...KINDS.map((k) => i("tune.kind_" + k, { tag: "option", value: k })))),
      field("tune.file", h("input", { type: "file", id: "tn-file", accept: ".jsonl,application/jsonl,application/json,text/plain" })),
      h("div", { class: "actions" }, i("tune.upload", { tag: "button", type: "submit", id: "tn-upload-go" })),
      h("p", { class: "muted wide", id: "tn-format" }),
      h("p", { class: "msg wide", id: "tn-upload-msg", role: "status" })),
    h("table", { id: "tn-datasets", class: "grid", tabindex: "0" }, h("thead", {}, h("tr", {},
      i("col.name", { tag: "th" }), i("tune.kind", { tag: "th" }), i("tune.examples", { tag: "th" }), i("col.size", { tag: "th" }), h("th", {}, i("runs.actions", { class: "sr-only" })))), h("tbody")),
    i("tune.no_datasets", { tag: "p", id: "tn-datasets-empty", class: "muted" }),
    h("div", { id: "tn-preview", class: "card", hidden: true },
      h("div", { class: "tn-preview-head" }, h("h3", { id: "tn-preview-title" }),
        field("tune.preview_model", h("select", { id: "tn-preview-model" }))),
      h("p", { id: "tn-preview-summary" }),
      h("p", { class: "muted tn-legend" }, h("span", { class: "tn-tok sup", text: A.t("tune.legend_trained"), "data-i18n": "tune.legend_trained" }), " ",
        h("span", { class: "tn-tok", text: A.t("tune.legend_context"), "data-i18n": "tune.legend_context" })),
      h("div", { id: "tn-preview-rows", tabindex: "0", role: "region", "aria-labelledby": "tn-preview-title" })),
    // a run
    h("form", { id: "tn-form", class: "card form-grid", autocomplete: "off" },
      i("tune.start_title", { tag: "h3", class: "wide" }),
      field("tune.method", h("select", { id: "tn-method" }, i("tune.method_sft", { tag: "option", value: "sft" }),
        i("tune.method_dpo", { tag: "option", value: "dpo" }), i("tune.method_grpo", { tag: "option", value: "grpo" }),
        i("tune.method_distill", { tag: "option", value: "distill" }))),
      field("tune.model", h("select", { id: "tn-model", required: true })),
      field("tune.new_model", h("input", { id: "tn-new", required: true, maxlength: "100" })),
      field("tune.dataset", h("select", { id: "tn-dataset" }), { class: "tn-data" }),
      field("tune.preset", h("select", { id: "tn-preset" }), { class: "tn-only-distill" }),
      field("tune.mode", h("select", { id: "tn-mode" }, i("tune.mode_logits", { tag: "option", value: "logits" }),
        i("tune.mode_sequence", { tag: "option", value: "sequence" })), { class: "tn-only-distill" }),
      h("fieldset", { class: "wide tn-only-distill", id: "tn-books" }, i("tune.books", { tag: "legend" }), h("div", { class: "checks" })),
      field("tune.loss", h("select", { id: "tn-loss" }), { class: "tn-only-dpo" }),
      field("tune.sft_weight", num("tn-sft-weight", { min: 0, step: "any", placeholder: "0" }), { class: "tn-only-nll" }),
      field("tune.task", h("select", { id: "tn-task" }), { class: "tn-only-grpo" }),
      field("tune.steps", num("tn-steps", { min: 1, value: 50 })),
      field("tune.batch", num("tn-batch", { min: 1, value: 8 }), { class: "tn-batch" }),
      field("tune.lr", num("tn-lr", { min: 0, step: "any", placeholder: A.t("tune.default") })),
      field("tune.group", num("tn-group", { min: 2, value: 4 }), { class: "tn-only-grpo" }),
      field("tune.prompts", num("tn-prompts", { min: 1, value: 4 }), { class: "tn-only-grpo" }),
      field("tune.max_new", num("tn-max-new", { min: 1, value: 16 }), { class: "tn-only-grpo" }),
      field("tune.kl", num("tn-kl", { min: 0, step: "any", value: 0 }), { class: "tn-only-grpo" }),
      field("tune.temperature", num("tn-temperature", { min: 0, step: "any", value: 2 }), { class: "tn-only-logits" }),
      field("tune.alpha", num("tn-alpha", { min: 0, max: 1, step: "any", value: 0.5 }), { class: "tn-only-logits" }),
      h("fieldset", { class: "wide form-grid tn-lora" }, i("tune.lora", { tag: "legend" }),
        field("tune.lora_rank", num("tn-lora-rank", { min: 1, placeholder: A.t("tune.lora_off") })),
        field("tune.lora_alpha", num("tn-lora-alpha", { min: 0, step: "any", placeholder: A.t("tune.lora_alpha_default") })),
        field("tune.lora_dropout", num("tn-lora-dropout", { min: 0, max: 0.99, step: "any", placeholder: "0" })),
        field("tune.lora_targets", h("input", { id: "tn-lora-targets", placeholder: "all-linear" })),
        field("tune.lora_hard_tokens", num("tn-lora-hard", { min: 1, placeholder: "0" }), { class: "tn-only-sft" }),
        h("label", { class: "check wide" }, h("input", { type: "checkbox", id: "tn-lora-new-tokens" }), " ",
          i("tune.lora_new_tokens", { tag: "span" }))),
      h("div", { class: "actions wide" }, i("tune.start", { tag: "button", type: "submit", id: "tn-start" }),
        h("span", { id: "tn-msg", class: "msg", role: "status" }))),
    h("table", { id: "tn-runs", class: "grid", tabindex: "0" }, h("thead", {}, h("tr", {}, h("th", { text: "#" }), i("tune.what", { tag: "th" }),
      i("col.status", { tag: "th" }), i("tune.progress", { tag: "th" }), h("th", {}, i("runs.actions", { class: "sr-only" })))), h("tbody")),
    i("tune.no_runs", { tag: "p", id: "tn-runs-empty", class: "muted" }),
    h("div", { id: "tn-detail", class: "card", hidden: true }, h("h3", { id: "tn-detail-head" }), h("div", { class: "error", id: "tn-error", hidden: true }),
      h("div", { id: "tn-charts", class: "charts tn-charts" })));
  for (const [id, name] of Object.entries(API_FIELDS)) $("#" + id).dataset.field = name;
  $("#tn-upload").addEventListener("submit", (ev) => { ev.preventDefault(); upload(); });
  $("#tn-kind").addEventListener("change", renderFormat);
  $("#tn-form").addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
  $("#tn-method").addEventListener("change", () => { $("#tn-msg").textContent = ""; renderForm(true); });
  $("#tn-loss").addEventListener("change", () => renderForm(true));
  $("#tn-mode").addEventListener("change", () => renderForm());
  $("#tn-preset").addEventListener("change", () => renderForm(true));
  $("#tn-model").addEventListener("change", () => renderForm(true));
  $("#tn-new").addEventListener("input", () => { T.named = true; });
  $("#tn-preview-model").addEventListener("change", () => preview(T.previewName));
}

// the tab is shown: what runs can be (tasks, losses) once, and the datasets again (files may have changed)
export async function showTune() {
  try {
    if (!T.options) T.options = await A.api("GET", "/api/v1/tune/options");
    T.datasets = await A.api("GET", "/api/v1/datasets");
  } catch (e) { A.toast(e.message, true); }
  renderTune();
}

function setMsg(el, text, ok = true) {
  el.textContent = ok ? text : "✗ " + text;
  el.className = "msg " + (ok ? "ok" : "bad") + (el.classList.contains("wide") ? " wide" : "");
}

function renderFormat() {
  $("#tn-format").textContent = A.t("tune.format_" + $("#tn-kind").value);
}

async function upload() {
  const file = $("#tn-file").files[0], msg = $("#tn-upload-msg");
  if (!file) return setMsg(msg, A.t("tune.pick_file"), false);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("kind", $("#tn-kind").value);
  // a dataset of that name is replaced only when the user says so (it was replaced without a word)
  const exists = T.datasets.some((d) => d.name === file.name);
  if (exists && !confirm(A.t("books.confirm_replace", { name: file.name }))) return setMsg(msg, A.t("books.kept", { name: file.name }), false);
  setMsg(msg, A.t("books.uploading", { name: file.name }));
  try {
    const res = await fetch("/api/v1/datasets" + (exists ? "?overwrite=true" : ""), { method: "POST", headers: A.apiHeaders(), body: form });
    const data = await res.json().catch(() => ({}));
    // the server's reason names the file (and the line that is wrong)
    if (res.status !== 201) return setMsg(msg, A.problemText(data) || `${file.name}: ${res.status} ${res.statusText}`, false);
    setMsg(msg, A.t("tune.uploaded", { name: data.name, n: A.fmtNum(data.examples), kind: A.t("tune.kind_" + data.kind) }));
    T.datasets = await A.api("GET", "/api/v1/datasets");
    renderTune();
    preview(data.name);
  } catch (e) { setMsg(msg, e.message, false); }
}

async function removeDataset(name) {
  if (!confirm(A.t("tune.confirm_delete", { name }))) return;
  try {
    await A.api("DELETE", `/api/v1/datasets/${encodeURIComponent(name)}`);
    if (T.previewName === name) { T.previewName = null; T.preview = null; $("#tn-preview").hidden = true; }
    T.datasets = await A.api("GET", "/api/v1/datasets");
    renderTune();
  } catch (e) { A.toast(e.message, true); }
}

const trained = () => A.S.models.filter((m) => m.trained);

// the preview of `name` with the model chosen above it (the first trained model at first)
async function preview(name) {
  if (!name) return;
  T.previewName = name;
  const sel = $("#tn-preview-model"), box = $("#tn-preview");
  box.hidden = false;
  $("#tn-preview-title").textContent = A.t("tune.preview_of", { name });
  fillModels(sel);
  if (!sel.value) {
    $("#tn-preview-summary").textContent = A.t("gen.no_models");
    $("#tn-preview-rows").replaceChildren();
    return;
  }
  try {
    T.preview = await A.api("GET", `/api/v1/datasets/${encodeURIComponent(name)}/preview?rows=5&model=${encodeURIComponent(sel.value)}`);
    $("#tn-preview-summary").className = "";
  } catch (e) {
    T.preview = null;
    $("#tn-preview-summary").className = "msg bad";
    $("#tn-preview-summary").textContent = "✗ " + e.message;
    $("#tn-preview-rows").replaceChildren();
    return;
  }
  renderPreview();
}

function renderPreview() {
  const p = T.preview, { h, t } = A;
  if (!p) return;
  $("#tn-preview-title").textContent = t("tune.preview_of", { name: p.name });
  $("#tn-preview-summary").textContent = t("tune.preview_summary", { n: A.fmtNum(p.examples), sup: A.fmtNum(p.supervised_tokens),
    cut: A.fmtNum(p.truncated), ctx: A.fmtNum(p.context) }) + (p.counted < p.examples ? " " + t("tune.preview_counted", { n: A.fmtNum(p.counted) }) : "") + (p.added_tokens.length ? " " + t("tune.added_tokens", { tokens: p.added_tokens.join(" ") }) : "");
  $("#tn-preview-rows").replaceChildren(...p.rows.map((r) => h("div", { class: "tn-row", "data-line": r.line, "data-side": r.side },
    h("div", { class: "muted tn-row-head", text: t("tune.row_head", { line: r.line, side: r.side ? t("tune.side_" + r.side) : "",
      sup: r.mask.reduce((a, b) => a + b, 0), n: r.ids.length }) + (r.truncated ? " · " + t("tune.row_cut") : "") }),
    // a visible mark on trained tokens (colour and underline both: not by colour alone); the token's id on hover
    h("div", { class: "tn-tokens" }, ...r.tokens.map((x, k) => h("span", { class: "tn-tok" + (x.trained ? " sup" : ""), title: `${r.ids[k]}`,
      text: x.text.replace(/\n/g, "↵\n") }))))));
}

function fillModels(sel) {
  const keep = sel.value, names = trained().map((m) => m.name), sig = names.join("\n");
  if (sel.dataset.sig !== sig) {
    sel.replaceChildren(...names.map((n) => A.h("option", { value: n, text: n })));
    sel.dataset.sig = sig;
    if (names.includes(keep)) sel.value = keep;
  }
}

// the options of a select, redrawn only when they change (the runs list refreshes every 2 s)
function options(sel, items) {
  const keep = sel.value, sig = JSON.stringify(items);
  if (sel.dataset.sig === sig) return;
  sel.replaceChildren(...items.map(([value, text]) => A.h("option", { value, text })));
  sel.dataset.sig = sig;
  if (items.some(([v]) => v === keep)) sel.value = keep;
}

function renderForm(changed = false) {
  const { t } = A, method = $("#tn-method").value, o = T.options;
  $("#tn-lr").placeholder = t("tune.default");
  $("#tn-lora-alpha").placeholder = t("tune.lora_alpha_default");
  $("#tn-lora-rank").placeholder = t("tune.lora_off");
  fillModels($("#tn-model"));
  if (o) {
    options($("#tn-loss"), o.losses.map((l) => [l, l.toUpperCase()]));
    options($("#tn-task"), o.tasks.map((x) => [x, t("tune.task_" + x)]));
  }
  const wanted = o ? o.method_kinds[method === "dpo" && $("#tn-loss").value === "kto" ? "kto" : method] || [] : [];
  options($("#tn-dataset"), T.datasets.filter((d) => wanted.includes(d.kind)).map((d) => [d.name, `${d.name} · ${t("tune.kind_" + d.kind)}`]));
  if (o) options($("#tn-preset"), o.presets.map((x) => [x, x]));
  const books = A.S.books.map((b) => b.name), box = $("#tn-books .checks");
  if (box.dataset.sig !== JSON.stringify(books)) {  // keep what is ticked
    const ticked = new Set([...box.querySelectorAll("input:checked")].map((x) => x.value));
    box.replaceChildren(...(books.length ? books.map((b) => A.h("label", { class: "check" }, A.h("input", { type: "checkbox", value: b, checked: ticked.has(b) }), " " + b))
      : [A.h("p", { class: "muted", text: t("train.no_books") })]));
    box.dataset.sig = JSON.stringify(books);
  }
  const shown = { "tn-data": ["sft", "dpo"], "tn-batch": ["sft", "dpo", "distill"], "tn-only-dpo": ["dpo"], "tn-only-grpo": ["grpo"],
                  "tn-only-distill": ["distill"], "tn-lora": ["sft", "dpo", "grpo"], "tn-only-sft": ["sft"] };
  for (const [cls, methods] of Object.entries(shown)) for (const e of document.querySelectorAll(`#tn-form .${cls}`)) e.hidden = !methods.includes(method);
  for (const e of document.querySelectorAll("#tn-form .tn-only-logits")) e.hidden = method !== "distill" || $("#tn-mode").value !== "logits";
  // DPO + NLL: the chosen completions' NLL added to the losses that have a reference-free pair term
  for (const e of document.querySelectorAll("#tn-form .tn-only-nll")) e.hidden = method !== "dpo" || !["dpo", "ipo", "simpo"].includes($("#tn-loss").value || "dpo");
  const suffix = method === "dpo" ? $("#tn-loss").value || "dpo" : method === "distill" ? $("#tn-preset").value || "student" : method;
  if (!T.named && $("#tn-model").value && (changed || !$("#tn-new").value)) $("#tn-new").value = `${$("#tn-model").value}-${suffix}`;
  $("#tn-start").disabled = !trained().length;
}

async function start() {
  const { t } = A, method = $("#tn-method").value, msg = $("#tn-msg");
  const val = (id) => $(id).value.trim(), n = (id) => (val(id) === "" ? undefined : Number(val(id)));
  const body = { method, model: val("#tn-model"), new_model: val("#tn-new"), max_steps: n("#tn-steps"), lr: n("#tn-lr") };
  if (method !== "distill") Object.assign(body, { lora_rank: n("#tn-lora-rank"), lora_alpha: n("#tn-lora-alpha"), lora_dropout: n("#tn-lora-dropout"),
                                                   lora_targets: val("#tn-lora-targets") || undefined,
                                                   lora_new_tokens: $("#tn-lora-new-tokens").checked || undefined });
  if (method === "grpo") Object.assign(body, { task: val("#tn-task"), group_size: n("#tn-group"), prompts_per_step: n("#tn-prompts"), max_new_tokens: n("#tn-max-new"), kl_coef: n("#tn-kl") });
  else if (method === "distill") {
    const books = [...document.querySelectorAll("#tn-books input:checked")].map((x) => x.value);
    if (!books.length) return setMsg(msg, t("tune.pick_books"), false);
    Object.assign(body, { books, preset: val("#tn-preset"), mode: val("#tn-mode"), batch_size: n("#tn-batch") });
    if (body.mode === "logits") Object.assign(body, { temperature: n("#tn-temperature"), alpha: n("#tn-alpha") });
  } else {
    if (!val("#tn-dataset")) return setMsg(msg, t("tune.pick_dataset"), false);
    Object.assign(body, { dataset: val("#tn-dataset"), batch_size: n("#tn-batch") });
    if (method === "sft") body.lora_hard_tokens = n("#tn-lora-hard");
    if (method === "dpo") Object.assign(body, { loss: val("#tn-loss"), sft_weight: $("#tn-sft-weight").closest("[hidden]") ? undefined : n("#tn-sft-weight") });
  }
  if (T.starting) return;  // a double click sends one request, not two
  T.starting = true;
  try {
    const run = await A.api("POST", "/api/v1/runs/tune", body);
    setMsg(msg, A.startedOrQueued(run, "tune.started"));
    T.named = false;
    select(run.id);
    await A.refreshRuns();
  } catch (e) { setMsg(msg, e.message, false); } finally { T.starting = false; }
}

function select(id) {
  T.current = id;
  A.S.follows.set("tune", id);  // kept following when the runs tab unticks it or resumes it
  A.subscribe(id);  // the run's metrics (replayed, then live) into S.metrics; app.js redraws, and so do we
  renderTune();
}

export function renderTune() {
  if (!A || !$("#tn-form")) return;
  const { S, t, h } = A;
  renderFormat();
  renderForm();
  keepFocus($("#tn-datasets tbody"), T.datasets.map((d) => h("tr", { "data-dataset": d.name, class: d.name === T.previewName ? "selected" : "" },
    h("td", { text: d.name }), h("td", { text: d.kind ? t("tune.kind_" + d.kind) : d.problem }), h("td", { class: "num", text: A.fmtNum(d.examples) }),
    h("td", { class: "num", text: A.fmtBytes(d.size) }),
    h("td", {}, h("button", { type: "button", class: "preview", text: t("books.preview"), disabled: !d.kind, onclick: () => preview(d.name) }), " ",
      h("button", { type: "button", class: "danger", text: t("books.delete"), onclick: () => removeDataset(d.name) })))), "data-dataset");
  $("#tn-datasets").hidden = !T.datasets.length;
  $("#tn-datasets-empty").hidden = T.datasets.length > 0;
  if (T.preview) renderPreview();
  const runs = S.runs.filter((r) => r.kind === "tune");
  keepFocus($("#tn-runs tbody"), runs.map((r) => h("tr", { "data-run": r.id, "data-status": r.status, class: r.id === T.current ? "selected" : "" },
    h("td", {}, h("a", { href: `#run/${r.id}`, class: "run-link", text: `#${r.id}` })), h("td", { text: tuneName(r) }),
    h("td", {}, h("span", { class: "badge " + r.status, text: A.statusLabel(r) })),
    h("td", { class: "num", text: `${A.fmtNum(r.current_step)} / ${A.fmtNum(r.max_steps)}` }),
    h("td", {},
      h("button", { type: "button", class: "view", text: t("lab.view"), onclick: () => select(r.id) }), " ",
      A.ACTIVE.has(r.status) && !r.cancel_requested ? h("button", { type: "button", class: "danger cancel", text: t("runs.cancel"), onclick: () => A.runAction(r.id, "cancel") }) : null, " ",
      r.can_resume ? h("button", { type: "button", class: "resume", text: t("runs.resume"), onclick: () => A.runAction(r.id, "resume") }) : null, " ",
      r.can_restart ? h("button", { type: "button", class: "restart", text: t("runs.restart"), onclick: () => A.runAction(r.id, "restart") }) : null, " ",
      !A.ACTIVE.has(r.status) ? h("button", { type: "button", class: "danger", text: t("runs.delete"), onclick: () => A.deleteRun(r.id) }) : null))), "data-run");
  $("#tn-runs").hidden = !runs.length;
  $("#tn-runs-empty").hidden = runs.length > 0;
  renderDetail(runs.find((r) => r.id === T.current));
}

function renderDetail(r) {
  const box = $("#tn-detail"), { t, h } = A;
  box.hidden = !r;
  if (!r) return;
  $("#tn-detail-head").textContent = `#${r.id} · ${tuneName(r)} · ${A.statusLabel(r)}`;
  $("#tn-error").hidden = !r.error;
  $("#tn-error").textContent = runErrorText(r.error);
  const charts = chartsOf(r), sig = JSON.stringify([r.id, charts.map((c) => t(c.key))]);
  if (T.sigs.charts !== sig) {  // made once per run and language; drawn on every new metrics line
    T.sigs.charts = sig;
    $("#tn-charts").replaceChildren(...charts.map((c) => h("figure", { class: "chart-box" }, h("figcaption", { text: t(c.key) }),
      h("div", { class: "chart", id: "chart-" + c.id, role: "img", "aria-label": t(c.key) }))));
  }
  renderTuneCharts();
}

// app.js calls this when metrics arrive; drawn only while the tab shows them (a hidden chart has no width)
export function renderTuneCharts() {
  const r = A && A.S.runs.find((x) => x.id === T.current && x.kind === "tune");
  if (!r || $("#tab-tune").hidden) return;
  const runs = [{ id: r.id, kind: "tune", color: A.COLORS[(r.id - 1) % A.COLORS.length], metrics: A.S.metrics.get(r.id) || [] }];
  for (const c of chartsOf(r)) {
    const el = document.getElementById("chart-" + c.id);
    if (el) drawChartInto(el, { id: c.id, keys: c.keys, group: "train-charts" }, runs, A.t, A.t(A.ACTIVE.has(r.status) ? "tune.waiting" : "chart.none_logged"));
  }
}
