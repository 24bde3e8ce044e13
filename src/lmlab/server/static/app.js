// lmlab web UI: plain ES modules, no framework, no CDN. Talks only to /api/v1 on the same server.

import { LANGUAGES, STRINGS } from "/static/i18n.js";
import { drawChartInto, drawCharts } from "/static/charts.js";
import { confirmNewVersion, fillVersions, lineageText, versionParams, versionPicker } from "/static/versions.js";
import { chartEmpty, initRunPage, metricsChanged, openRun, patchRows, renderCompare, tableRuns } from "/static/runpage.js";
import { errorText as detailText, keepFocus, renderGuide, runErrorText, setupUx, tokenEstimate } from "/static/ux.js";
import { evalName, hasReport, initEvaluate, renderEvaluate, showEvaluate } from "/static/evaluate.js";
import { DERIVED_KINDS, derivedName, initModelPage, openModel, renderModelPage } from "/static/modelpage.js";
import { initChat, renderChat, showChat } from "/static/chat.js";
import { initData, renderData, showData } from "/static/data.js";
import { initTune, renderTune, renderTuneCharts, showTune, tuneName } from "/static/tune.js";
import { fillSteering, initSteering, steerParams } from "/static/steer.js";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const ACTIVE = new Set(["queued", "running"]);

// what a new run's start says: it waits when runs are queued before it, or when every job slot is taken (a new
// run is "queued" at position 0 until the supervisor starts it, which a free slot does at once)
function startedOrQueued(run, key, params = {}) {
  const busy = S.runs.filter((r) => r.status === "running").length >= ((S.info && S.info.max_jobs) || 1);
  return run.queue_position != null && (run.queue_position > 0 || busy)
    ? t("train.queued", { id: run.id, pos: run.queue_position + 1 }) : t(key, { id: run.id, ...params });
}

// ---- language --------------------------------------------------------------------------------------

let lang = localStorage.getItem("lmlab.lang") || ((navigator.language || "en").startsWith("ru") ? "ru" : "en");

export function t(key, params = {}) {
  const texts = STRINGS[key];
  const s = texts ? texts[Math.max(0, LANGUAGES.indexOf(lang))] : key;
  return s.replace(/\{(\w+)\}/g, (_, k) => (params[k] ?? ""));
}

function applyLanguage() {
  document.documentElement.lang = lang;
  $("#lang").value = lang;
  for (const e of $$("[data-i18n]")) e.textContent = t(e.dataset.i18n);
  renderAll();
}

// ---- API access ------------------------------------------------------------------------------------

// Opened as /?token=...: the server also set an HttpOnly cookie; keep the token for fetch() headers and
// drop it from the address bar so it is not copied around with the URL.
const query = new URLSearchParams(location.search);
if (query.get("token")) {
  sessionStorage.setItem("lmlab.token", query.get("token"));
  query.delete("token");
  history.replaceState(null, "", location.pathname + (query.toString() ? "?" + query : "") + location.hash);
}
const token = sessionStorage.getItem("lmlab.token");
export const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url);
// Every request that changes something carries this header: the server refuses such requests without it
// (or a JSON body), which a page of another site cannot send (app.py, cross_site).
export const apiHeaders = () => ({ "X-Lmlab-Request": "1", ...(token ? { Authorization: "Bearer " + token } : {}) });

export async function api(method, path, body) {
  const opts = { method, headers: apiHeaders() };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error(t("error.network", { detail: e.message }));
  }
  if (res.status === 204) return null;
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(problemText(data) || `${res.status} ${res.statusText}`);
  return data;
}

// An API error in the page's language where the server named it (app.py's Problem: error.key and its params,
// looked up as problem.KEY), else the server's own sentence (English) or FastAPI's validation errors in words.
function problemText(data) {
  const e = data && data.error;
  if (e && lang !== "en" && STRINGS["problem." + e.key]) return t("problem." + e.key, e.params || {});
  return detailText(data && data.detail);
}

function toast(text, bad = false) {
  const d = document.createElement("div");
  d.textContent = bad ? "✗ " + text : text;  // errors look as in the forms' messages
  if (bad) d.className = "bad";
  $("#toast").appendChild(d);
  setTimeout(() => d.remove(), bad ? 8000 : 4000);
}

function setMsg(el, text, ok = true) {
  el.textContent = text;
  el.className = "msg " + (ok ? "ok" : "bad");
}

const fmtBytes = (n) => n >= 2 ** 30 ? (n / 2 ** 30).toFixed(2) + " GiB" : n >= 2 ** 20 ? (n / 2 ** 20).toFixed(1) + " MiB"
  : n >= 1024 ? (n / 1024).toFixed(1) + " KiB" : n + " B";
const fmtNum = (n) => (n == null ? "—" : Number(n).toLocaleString(lang === "ru" ? "ru-RU" : "en-US"));
const fmtLoss = (x) => (x == null ? "—" : x.toFixed(4));

export function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else if (v !== false && v != null) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

// ---- state -----------------------------------------------------------------------------------------

const S = {
  info: null, presets: [], books: [], models: [], runs: [],
  selected: new Set(),      // runs overlaid on the charts
  current: null,            // the run whose details are shown
  labCurrent: null,         // the experiment run whose log and report the Lab tab shows
  metrics: new Map(),       // run id -> [metric, ...] ordered by step
  streams: new Map(),       // run id -> EventSource
  follows: new Map(),       // a view (tune) -> the run whose charts it shows: its stream stays open when unticked here
};

// a run's metrics stream is shared: open while the runs tab overlays the run or another view follows it
const wanted = (id) => S.selected.has(id) || [...S.follows.values()].includes(id);

// ---- tabs ------------------------------------------------------------------------------------------

function showTab(name) {
  const page = /^run\/(\d+)$/.exec(name);  // a run's own page: #run/ID (runpage.js)
  if (page) { name = "run"; openRun(+page[1]); }
  const mpage = /^model\/(.+)$/.exec(name);  // a model's own page: #model/NAME (modelpage.js)
  if (mpage) { name = "model"; openModel(decodeURIComponent(mpage[1])); }
  if (!$("#tab-" + name) || (name === "run" && !page) || (name === "model" && !mpage)) name = "books";
  for (const s of $$(".tab")) s.hidden = s.id !== "tab-" + name;
  for (const b of $$("#tabs button")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  const hash = page ? page[0] : mpage ? mpage[0] : name;
  if (location.hash !== "#" + hash) history.replaceState(null, "", "#" + hash);
  if (name === "runs") {
    if (!S.selected.size && S.runs.length) selectRun(S.runs[0].id);
    else redrawCharts();  // hidden charts were drawn at a guessed width
  }
  if (name === "models") scheduleEstimate();
  if (name === "train") renderTrainEstimate();
  if (name === "lab") loadLabLog();
  if (name === "evaluate") showEvaluate();
  if (name === "model") renderModelPage();
  if (name === "chat") showChat();
  if (name === "tune") showTune();
  if (name === "data") showData();
}

// ---- books -----------------------------------------------------------------------------------------

function renderBooks() {
  const body = $("#books-table tbody");
  keepFocus(body, S.books.map((b) => h("tr", { "data-book": b.name },
    h("td", { text: b.name }), h("td", { class: "num", text: fmtBytes(b.size_bytes) }),
    h("td", { class: "num", text: fmtNum(b.chars) }), h("td", { class: "num", text: "≈ " + fmtNum(tokenEstimate(b.chars)) }), h("td", { text: b.encoding }),
    h("td", {},
      h("button", { type: "button", text: t("books.preview"), onclick: () => previewBook(b.name) }), " ",
      h("button", { type: "button", class: "danger", text: t("books.delete"), onclick: () => deleteBook(b.name) })))), "data-book");
  $("#books-empty").hidden = S.books.length > 0;
  renderGuide();
  if (S.info) {
    $("#drop-hint").textContent = t("books.hint", { suffixes: S.info.book_suffixes.join(" "),
                                                    limit: fmtBytes(S.info.max_upload_bytes) });
    $("#book-input").accept = S.info.book_suffixes.join(",");
  }
}

async function refreshBooks() {
  S.books = await api("GET", "/api/v1/books");
  renderBooks();
  renderTrainForm();
}

function validateFile(file) {
  const suffix = "." + file.name.split(".").pop().toLowerCase();
  const limit = S.info.max_upload_bytes;
  if (!file.name.includes(".") || !S.info.book_suffixes.includes(suffix))
    return t("books.bad_suffix", { name: file.name, suffixes: S.info.book_suffixes.join(" ") });
  if (file.size === 0) return t("books.empty_file", { name: file.name });
  if (file.size > limit) return t("books.too_big", { name: file.name, size: fmtBytes(file.size), limit: fmtBytes(limit) });
  return null;
}

function uploadFile(file) {
  const li = h("li", { "data-file": file.name }, t("books.uploading", { name: file.name }), " ", h("progress", { max: 100, value: 0 }));
  $("#upload-list").prepend(li);
  const problem = validateFile(file);
  if (problem) {
    li.className = "bad";
    li.textContent = "✗ " + problem;
    return Promise.resolve();
  }
  // a book of that name is replaced only when the user says so (it was replaced without a word)
  const exists = S.books.some((b) => b.name === file.name);
  if (exists && !confirm(t("books.confirm_replace", { name: file.name }))) {
    li.className = "bad";
    li.textContent = "✗ " + t("books.kept", { name: file.name });
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();  // (fetch has no upload progress)
    xhr.open("POST", "/api/v1/books" + (exists ? "?overwrite=true" : ""));
    for (const [k, v] of Object.entries(apiHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) $("progress", li).value = (100 * e.loaded) / e.total; };
    xhr.onload = () => {
      let data = {};
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status === 201) {
        li.className = "ok";
        li.textContent = "✓ " + t("books.uploaded", { name: data.name, chars: fmtNum(data.chars), encoding: data.encoding });
      } else {
        li.className = "bad";
        li.textContent = `✗ ${file.name}: ${problemText(data) || xhr.status + " " + xhr.statusText}`;
      }
      refreshBooks().finally(resolve);
    };
    xhr.onerror = () => {
      li.className = "bad";
      li.textContent = `✗ ${file.name}: ` + t("error.network", { detail: "upload failed" });
      resolve();
    };
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

async function handleFiles(files) {
  for (const f of files) await uploadFile(f);
}

async function previewBook(name) {
  try {
    const p = await api("GET", `/api/v1/books/${encodeURIComponent(name)}/preview?chars=3000`);
    $("#book-preview-title").textContent = name;
    $("#book-preview").textContent = p.text + (p.truncated ? "\n…" : "");
    $("#book-preview-box").hidden = false;
  } catch (e) { toast(e.message, true); }
}

async function deleteBook(name) {
  if (!confirm(t("books.confirm_delete", { name }))) return;
  try { await api("DELETE", `/api/v1/books/${encodeURIComponent(name)}`); await refreshBooks(); }
  catch (e) { toast(e.message, true); }
}

function setupDropzone() {
  const zone = $("#dropzone"), input = $("#book-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  input.addEventListener("change", () => { handleFiles([...input.files]); input.value = ""; });
  for (const ev of ["dragenter", "dragover"]) zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  zone.addEventListener("drop", (e) => handleFiles([...e.dataTransfer.files]));
  // a file dropped outside the zone must not navigate away from the app
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

// ---- models ----------------------------------------------------------------------------------------

function modelSpec() {
  const spec = { tokenizer_kind: $("#model-tokenizer").value, family: $("#model-family").value };
  const vocab = parseInt($("#model-vocab").value, 10);
  if (vocab) spec.vocab_size = vocab;
  if ($("#model-source").value === "preset") {
    spec.preset = `${spec.family}-${$("#model-size").value}`;
    delete spec.family;
  } else {
    for (const f of ["n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "intermediate_size"]) {
      const v = parseInt($("#f-" + f).value, 10);
      if (v) spec[f] = v;
    }
  }
  return spec;
}

let estimateTimer = null;
function scheduleEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(renderEstimate, 200);
}

async function renderEstimate() {
  const box = $("#estimate");
  try {
    const e = await api("POST", "/api/v1/models/estimate", modelSpec());
    box.replaceChildren(
      h("span", { class: "big", id: "param-count", text: fmtNum(e.parameters) }), " " + t("models.params") + " · ",
      `${t("models.train_mem", { batch: e.batch_size })}: ~${fmtBytes(e.training_bytes)} · `,
      `${t("models.infer_mem")}: ~${fmtBytes(e.inference_bytes)} · `,
      e.fits ? h("span", { class: "ok", text: "✓ " + t("models.fits", { budget: fmtBytes(e.memory_budget_bytes) }) })
        : h("span", { class: "bad", text: "✗ " + e.reason }));
    $("#create-model").disabled = false;
  } catch (err) {
    box.replaceChildren(h("span", { class: "bad", text: "✗ " + err.message }));
  }
}

function setupModelForm() {
  const sizes = S.info.sizes;
  $("#model-size").replaceChildren(...sizes.map((s) => h("option", { value: s, text: s })));
  $("#model-size").value = "tiny";
  const syncVocab = () => {
    const p = S.presets.find((x) => x.name === `${$("#model-family").value}-${$("#model-size").value}`);
    if (p && $("#model-source").value === "preset") $("#model-vocab").value = p.config.vocab_size;
  };
  const syncSource = () => {
    const custom = $("#model-source").value === "custom";
    for (const e of $$(".custom-only")) e.hidden = !custom;
    for (const e of $$(".preset-only")) e.hidden = custom;
  };
  $("#model-source").addEventListener("change", () => { syncSource(); syncVocab(); });
  $("#model-size").addEventListener("change", syncVocab);
  $("#model-family").addEventListener("change", syncVocab);
  $("#model-form").addEventListener("input", scheduleEstimate);
  $("#model-form").addEventListener("change", scheduleEstimate);
  syncSource();
  syncVocab();
  $("#model-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("#model-msg");
    try {
      const m = await api("POST", "/api/v1/models", { name: $("#model-name").value.trim(), ...modelSpec() });
      setMsg(msg, t("models.created", { name: m.name, params: fmtNum(m.parameters) }));
      await refreshModels();
      $("#train-model").value = m.name;
      onTrainModelChange();
    } catch (e) { setMsg(msg, "✗ " + e.message, false); }
  });
}

function modelState(m) {
  if (m.problem) return "⚠ " + m.problem;  // e.g. its folder is a symbolic link: listed, not usable
  if (m.active_run_id) return t("models.training", { id: m.active_run_id });
  const bits = [];
  if (m.selfplay_run_ids && m.selfplay_run_ids.length) bits.push(t("models.selfplay_reads", { ids: m.selfplay_run_ids.join(", ") }));
  // the server keeps an origin only while it is true: cleared when the model is trained from scratch
  const o = m.origin;
  const made = o && o.kind === "selfplay" ? t("models.selfplay_of", { parent: o.parent, reward: o.reward, id: o.run_id })
    : o && o.kind === "tune" ? t("tune.model_of", { parent: o.parent, how: (o.loss || o.method).toUpperCase() + (o.task || o.preset ? " " + (o.task || o.preset) : ""), id: o.run_id }) : null;
  if (made && m.trained_run_id === o.run_id) bits.unshift(made);  // its weights are the self-play's policy
  else {
    bits.unshift(m.trained ? t("models.trained", { steps: fmtNum(m.trained_steps) }) : t("models.untrained"));
    if (made) bits.push(made);  // trained further from that policy
  }
  if (lineageText(m)) bits.push(lineageText(m));
  return bits.join(" · ");
}

function renderModels() {
  keepFocus($("#models-table tbody"), S.models.map((m) => h("tr", { "data-model": m.name },
    h("td", {}, h("a", { href: `#model/${encodeURIComponent(m.name)}`, class: "model-link", text: m.name })), h("td", { text: m.preset || m.family }), h("td", { class: "num", text: fmtNum(m.parameters) }),
    h("td", { text: `${m.tokenizer_kind} · ${m.vocab_size}` }), h("td", { text: modelState(m) }),
    h("td", {},
      h("button", { type: "button", class: "train", text: t("models.train"), onclick: () => { $("#train-model").value = m.name; onTrainModelChange(); showTab("train"); } }), " ",
      m.trained ? h("button", { type: "button", text: t("models.generate"), onclick: () => { renderGenModels(); $("#gen-model").value = m.name; showTab("generate"); } }) : null, " ",
      m.trained ? h("button", { type: "button", class: "selfplay", text: t("models.selfplay"), onclick: () => { renderSelfPlayForm(); $("#sp-model").value = m.name; onSelfPlayModelChange(); showTab("selfplay"); } }) : null, " ",
      m.trained ? versionPicker(m) : null, " ",
      m.trained ? h("a", { href: withToken(`/api/v1/models/${encodeURIComponent(m.name)}/download`), download: `${m.name}.zip`, class: "download", text: t("models.download") }) : null, " ",
      // the exporters write full-precision weights only: an int8/int4 model's links were answered 422, silently
      m.trained && !m.quantized ? h("a", { href: withToken(`/api/v1/models/${encodeURIComponent(m.name)}/export/hf`), download: `${m.name}-hf.zip`, class: "export-hf", title: t("models.export_hf"), text: "HF" }) : null, " ",
      // GGUF holds llama.cpp's architectures and byte-level BPE only (interop/gguf_export.py)
      m.trained && !m.quantized && m.family !== "gpt" && m.tokenizer_kind === "bpe" ? h("a", { href: withToken(`/api/v1/models/${encodeURIComponent(m.name)}/export/gguf`), download: `${m.name}.gguf`, class: "export-gguf", title: t("models.export_gguf"), text: "GGUF" }) : null, " ",
      h("button", { type: "button", class: "danger", text: t("models.delete"), onclick: () => deleteModel(m.name) })))), "data-model");
  $("#models-empty").hidden = S.models.length > 0;
  renderGuide();
  renderModelPage();
}

async function refreshModels() {
  S.models = await api("GET", "/api/v1/models");
  renderModels();
  renderTrainForm();
  renderGenModels();
  renderSelfPlayForm();
}

async function deleteModel(name) {
  if (!confirm(t("models.confirm_delete", { name }))) return;
  try { await api("DELETE", `/api/v1/models/${encodeURIComponent(name)}`); await refreshModels(); await refreshRuns(); }
  catch (e) { toast(e.message, true); }
}

// ---- training --------------------------------------------------------------------------------------

// the non-empty number fields of a form (ids prefix + name), as integers or floats
function readNumbers(prefix, ints, floats) {
  const out = {};
  for (const f of [...ints, ...floats]) {
    const v = $(prefix + f).value;
    if (v !== "") out[f] = ints.includes(f) ? parseInt(v, 10) : parseFloat(v);
  }
  return out;
}

let lrTouched = false;

function renderTrainForm() {
  const sel = $("#train-model"), keep = sel.value;
  sel.replaceChildren(...S.models.map((m) => h("option", { value: m.name, text: `${m.name} (${fmtNum(m.parameters)})` })));
  if (S.models.some((m) => m.name === keep)) sel.value = keep;
  const box = $("#train-books");
  const checked = new Set($$("input:checked", box).map((i) => i.value));
  const first = !box.children.length || box.querySelector("p");
  box.replaceChildren(...S.books.map((b) => h("label", { class: "check" },
    h("input", { type: "checkbox", value: b.name, checked: first || checked.has(b.name) }), " " + b.name)));
  if (!S.books.length) box.append(h("p", { class: "muted", text: t("train.no_books") }));
  $("#start-training").disabled = !S.models.length || !S.books.length;
  if (!S.models.length) setMsg($("#train-msg"), t("train.no_models"), false);
  else if ($("#train-msg").textContent === t("train.no_models")) $("#train-msg").textContent = "";
  onTrainModelChange(false);
}

function onTrainModelChange(resetLr = true) {
  const m = S.models.find((x) => x.name === $("#train-model").value);
  if (!m) return;
  // small models tolerate (and need) a larger step: 1e-3 below 10M parameters, 3e-4 above
  if (resetLr || !lrTouched) { $("#t-lr").value = m.parameters < 10e6 ? "0.001" : "0.0003"; lrTouched = false; }
  $("#t-seq_len").placeholder = String(m.config.block_size);
  $("#t-init_from_trained").disabled = !m.trained;
  if (!m.trained) $("#t-init_from_trained").checked = false;
  renderTrainEstimate();
}

function renderTrainEstimate() {
  const m = S.models.find((x) => x.name === $("#train-model").value);
  if (!m) { $("#train-estimate").textContent = ""; return; }
  const seq = parseInt($("#t-seq_len").value, 10) || m.config.block_size;
  const perStep = (parseInt($("#t-batch_size").value, 10) || 16) * seq;
  $("#train-estimate").textContent = t("train.tokens", { tokens: fmtNum(perStep),
    total: fmtNum(perStep * (parseInt($("#t-max_steps").value, 10) || 0)) });
}

function setupTrainForm() {
  // only the devices this server has: cuda on a machine without a GPU failed the run after its data was made
  $("#t-device").replaceChildren(...S.info.devices.map((d) => h("option", { value: d, text: d })));
  $("#train-model").addEventListener("change", () => onTrainModelChange(true));
  $("#t-lr").addEventListener("input", () => { lrTouched = true; });
  $("#train-form").addEventListener("input", renderTrainEstimate);
  $("#train-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("#train-msg");
    const books = $$("#train-books input:checked").map((i) => i.value);
    if (!books.length) { setMsg(msg, t("train.pick_book"), false); return; }
    const body = confirmNewVersion({ model: $("#train-model").value, books, init_from_trained: $("#t-init_from_trained").checked,
                   schedule: $("#t-schedule").value, device: $("#t-device").value,
                   ...readNumbers("#t-", ["max_steps", "batch_size", "seq_len", "warmup_steps", "eval_every", "eval_batches", "save_every", "seed", "drift_every"],
                                  ["lr", "weight_decay", "grad_clip"]) }, S.models.find((m) => m.name === $("#train-model").value));
    if (!body) return;
    try {
      const run = await api("POST", "/api/v1/runs", body);
      setMsg(msg, startedOrQueued(run, "train.started"));
      await refreshRuns();
      S.selected.clear();
      selectRun(run.id);
      showTab("runs");
    } catch (e) { setMsg(msg, "✗ " + e.message, false); }
  });
}

// ---- self-play -------------------------------------------------------------------------------------

function renderSelfPlayForm() {
  const trained = S.models.filter((m) => m.trained);
  for (const sel of [$("#sp-model"), $("#sp-judge")]) {
    const keep = sel.value;
    sel.replaceChildren(...trained.map((m) => h("option", { value: m.name, text: m.name })));
    if (trained.some((m) => m.name === keep)) sel.value = keep;
  }
  $("#start-selfplay").disabled = !trained.length;
  if (!trained.length) setMsg($("#sp-msg"), t("sp.no_models"), false);
  else if ($("#sp-msg").textContent === t("sp.no_models")) $("#sp-msg").textContent = "";
  if (!$("#sp-new_model").value) onSelfPlayModelChange();
}

// a name for the new model that no model has, nor will have when an active self-play run ends: <model>-sp, <model>-sp2, ...
function onSelfPlayModelChange() {
  const base = $("#sp-model").value;
  if (!base) return;
  const taken = new Set(S.models.map((m) => m.name));
  for (const r of S.runs) if (r.kind === "selfplay" && ACTIVE.has(r.status)) taken.add(r.params.new_model);
  let name = `${base}-sp`;
  for (let i = 2; taken.has(name); i++) name = `${base}-sp${i}`;
  $("#sp-new_model").value = name;
}

function setupSelfPlayForm() {
  const syncJudge = () => { $("#sp-judge-box").hidden = $("#sp-reward").value !== "perplexity"; };
  $("#sp-reward").addEventListener("change", syncJudge);
  $("#sp-model").addEventListener("change", onSelfPlayModelChange);
  syncJudge();
  $("#sp-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("#sp-msg");
    const body = { model: $("#sp-model").value, new_model: $("#sp-new_model").value.trim(), reward: $("#sp-reward").value,
                   prompts: $("#sp-prompts").value.split("\n").filter((p) => p.trim()),
                   ...readNumbers("#sp-", ["iterations", "group_size", "prompts_per_iteration", "max_new_tokens", "seed"],
                                  ["lr", "kl_coef", "temperature"]) };
    if (body.reward === "perplexity") body.judge = $("#sp-judge").value;
    try {
      const run = await api("POST", "/api/v1/runs/selfplay", body);
      setMsg(msg, startedOrQueued(run, "sp.started"));
      $("#sp-new_model").value = "";
      await refreshRuns();
      S.selected.clear();
      selectRun(run.id);
      showTab("runs");
    } catch (e) { setMsg(msg, "✗ " + e.message, false); }
  });
}

// ---- lab experiments -------------------------------------------------------------------------------

const labName = (r) => r.kind === "eval" ? evalName(r) : DERIVED_KINDS.includes(r.kind) ? derivedName(r) : (r.params.lab === "facts" ? `facts · ${r.params.experiment}` : "azr") + (r.params.quick ? " · quick" : "");

function renderLab() {
  const runs = S.runs.filter((r) => r.kind === "experiment");
  keepFocus($("#lab-table tbody"), runs.map((r) => h("tr", { "data-run": r.id, "data-status": r.status, class: r.id === S.labCurrent ? "selected" : "" },
    h("td", { text: r.id }), h("td", { text: labName(r) }), h("td", { text: r.params.seeds.join(", ") }),
    h("td", {}, h("span", { class: "badge " + r.status, text: statusLabel(r) })),
    h("td", {},
      h("button", { type: "button", class: "view", text: t("lab.view"), onclick: () => { S.labCurrent = r.id; renderLab(); loadLabLog(); } }), " ",
      h("a", { href: `#run/${r.id}`, class: "run-link", text: t("rp.details") }), " ",
      ACTIVE.has(r.status) && !r.cancel_requested ? h("button", { type: "button", class: "danger cancel", text: t("runs.cancel"), onclick: () => runAction(r.id, "cancel") }) : null, " ",
      r.can_restart ? h("button", { type: "button", class: "restart", text: t("runs.restart"), onclick: () => runAction(r.id, "restart") }) : null, " ",
      r.status === "completed" ? h("a", { href: withToken(`/api/v1/runs/${r.id}/report`), target: "_blank", rel: "noopener", class: "report", text: t("lab.report") }) : null, " ",
      !ACTIVE.has(r.status) ? h("button", { type: "button", class: "danger", text: t("runs.delete"), onclick: () => deleteRun(r.id) }) : null))), "data-run");
  $("#lab-empty").hidden = runs.length > 0;
  const r = runs.find((x) => x.id === S.labCurrent);
  $("#lab-detail").hidden = !r;
  if (!r) return;
  $("#lab-detail-head").textContent = `#${r.id} · ${labName(r)} · ${statusLabel(r)}`;
  $("#lab-error").hidden = !r.error;
  $("#lab-error").textContent = runErrorText(r.error);
  // the report is written when the experiment completes; the frame loads it once, not on every refresh
  const done = r.status === "completed", frame = $("#lab-report"), src = withToken(`/api/v1/runs/${r.id}/report`);
  if (done && frame.dataset.run !== String(r.id)) { frame.src = src; frame.dataset.run = String(r.id); loadLabLog(); }
  if (!done && frame.dataset.run) { frame.removeAttribute("src"); delete frame.dataset.run; }
  frame.hidden = !done;
  $("#lab-report-link").hidden = !done;
  $("#lab-report-a").href = src;
}

function loadLabLog() { return loadLog(S.labCurrent, $("#lab-log")); }

function setupLabForm() {
  $("#lab-experiment").replaceChildren(...S.info.facts_experiments.map((x) => h("option", { value: x, text: x })));
  const syncLab = () => { $("#lab-experiment-box").hidden = $("#lab-lab").value !== "facts"; };
  $("#lab-lab").addEventListener("change", syncLab);
  syncLab();
  $("#lab-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("#lab-msg"), lab = $("#lab-lab").value;
    // what is not a whole number goes to the server as it is, so its 422 names the bad seed
    const seeds = $("#lab-seeds").value.split(",").map((x) => x.trim()).filter((x) => x).map((x) => (/^\d+$/.test(x) ? parseInt(x, 10) : x));
    const body = { lab, quick: $("#lab-quick").checked, seeds };
    if (lab === "facts") body.experiment = $("#lab-experiment").value;
    try {
      const run = await api("POST", "/api/v1/runs/experiment", body);
      setMsg(msg, startedOrQueued(run, "lab.started"));
      S.labCurrent = run.id;
      await refreshRuns();
      loadLabLog();
    } catch (e) { setMsg(msg, "✗ " + e.message, false); }
  });
}

// ---- runs and charts -------------------------------------------------------------------------------

const runColor = (id) => COLORS[(id - 1) % COLORS.length];

function statusLabel(r) {
  if (r.cancel_requested && ACTIVE.has(r.status)) return t("status.cancelling");
  return t("status." + r.status);
}

function renderRuns() {
  patchRows($("#runs-table tbody"), tableRuns(S.runs).map((r) => {
    const pct = r.progress == null ? 0 : Math.round(r.progress * 100);
    const overlay = h("input", { type: "checkbox", checked: S.selected.has(r.id), "aria-label": t("runs.overlay_run", { id: r.id }),
                                 onchange: (e) => (e.target.checked ? selectRun(r.id, false) : unselectRun(r.id)) });
    const sp = r.kind === "selfplay", tn = r.kind === "tune", lab = ["experiment", "eval", ...DERIVED_KINDS].includes(r.kind);
    const product = sp || tn ? r.params.new_model : r.model;
    const model = S.models.find((m) => m.name === product);
    return h("tr", { "data-run": r.id, "data-status": r.status, "data-kind": r.kind, class: r.id === S.current ? "selected" : "" },
      h("td", {}, overlay), h("td", {}, h("a", { href: `#run/${r.id}`, class: "run-link", text: `#${r.id}` })),
      sp ? h("td", { title: t("runs.reward", { reward: r.params.reward }) }, `${r.model} → ${product}`, h("span", { class: "kind", text: t("runs.kind_selfplay") }))
        : lab || tn ? h("td", {}, tn ? tuneName(r) : labName(r), h("span", { class: "kind", text: t("runs.kind_" + r.kind) }))
        : h("td", { text: r.model, title: `${t("runs.books")}: ${r.books.join(", ")}` }),
      h("td", {}, h("span", { class: "badge " + r.status, text: statusLabel(r) })),
      h("td", { class: "num" }, h("span", { class: "bar" }, (() => { const i = h("i"); i.style.width = pct + "%"; return i; })()),
        `${fmtNum(r.current_step)} / ${fmtNum(r.max_steps)}`),
      h("td", { class: "num", text: fmtLoss(sp ? null : r.last_loss) }), h("td", { class: "num", text: fmtLoss(r.best_val_loss) }),
      h("td", { class: "num", text: r.tokens_per_s_mean == null ? "—" : fmtNum(Math.round(r.tokens_per_s_mean)) }),
      h("td", { class: "num", text: r.last_reward == null ? "—" : `${fmtLoss(r.last_reward)} · ${fmtLoss(r.last_kl)}` }),
      h("td", {},
        h("button", { type: "button", text: t("runs.view"), onclick: () => selectRun(r.id) }), " ",
        ACTIVE.has(r.status) && !r.cancel_requested ? h("button", { type: "button", class: "danger cancel", text: t("runs.cancel"), onclick: () => runAction(r.id, "cancel") }) : null, " ",
        r.can_resume ? h("button", { type: "button", class: "resume", text: t("runs.resume"), onclick: () => runAction(r.id, "resume") }) : null, " ",
        r.can_restart ? h("button", { type: "button", class: "restart", text: t("runs.restart"), onclick: () => runAction(r.id, "restart") }) : null, " ",
        lab && r.status === "completed" && (r.kind === "experiment" || hasReport(r)) ? h("a", { href: withToken(`/api/v1/runs/${r.id}/report`), target: "_blank", rel: "noopener", class: "report", text: t("lab.report") }) : null, " ",
        // every completed run keeps its own final model (versions.js), not only the model's latest; a self-play
        // run's is not a version of a model made again under its name after it finished (services.made_by)
        r.status === "completed" && model && !lab && (!(sp || tn) || model.created_at <= r.updated_at) ? h("a", { href: withToken(`/api/v1/models/${encodeURIComponent(product)}/download?run=${r.id}`), download: `${product}-run${r.id}.zip`, class: "download", text: t("runs.download") }) : null, " ",
        !ACTIVE.has(r.status) ? h("button", { type: "button", class: "danger", text: t("runs.delete"), onclick: () => deleteRun(r.id) }) : null));
  }));
  $("#runs-empty").hidden = S.runs.length > 0;
  renderCompare();
  renderRunDetail();
  renderLab();
  renderEvaluate();
  renderModelPage();
  renderTune();
  renderData();
}

function renderRunDetail() {
  const r = S.runs.find((x) => x.id === S.current);
  $("#run-detail").hidden = !r;
  if (!r) return;
  const bits = [r.kind === "selfplay"
    ? `#${r.id} · ${t("runs.kind_selfplay")}: ${r.model} → ${r.params.new_model} · ${t("runs.reward", { reward: r.params.reward + (r.params.judge ? ` (${r.params.judge})` : "") })} · ${statusLabel(r)}`
    : ["experiment", "eval", "tune", ...DERIVED_KINDS].includes(r.kind) ? `#${r.id} · ${t("runs.kind_" + r.kind)}: ${r.kind === "tune" ? tuneName(r) : labName(r)} · ${statusLabel(r)}`
    : `#${r.id} · ${r.model} · ${t("runs.books")}: ${r.books.join(", ")} · ${statusLabel(r)}`];
  if (r.queue_position != null) bits.push(t("runs.queue", { pos: r.queue_position + 1 }));
  if (r.checkpoint_step != null) bits.push(t("runs.checkpoint", { step: r.checkpoint_step }));
  if (r.resumed_from_step != null) bits.push(t("runs.resumed_from", { step: r.resumed_from_step }));
  if (r.parent_run_id != null) bits.push(t("versions.continues", { id: r.parent_run_id, step: r.step_offset }));
  $("#run-detail-head").textContent = bits.join(" · ");
  $("#run-error").hidden = !r.error;
  $("#run-error").textContent = runErrorText(r.error);
}

async function refreshRuns() {
  S.runs = await api("GET", "/api/v1/runs");
  for (const id of [...S.selected]) if (!S.runs.some((r) => r.id === id)) unselectRun(id);
  renderRuns();
  const running = S.runs.filter((r) => r.status === "running").length, queued = S.runs.filter((r) => r.status === "queued").length;
  $("#jobs-indicator").textContent = running || queued ? t("jobs.indicator", { running, queued }) : "";
  // a model finishing training changes what can be generated and downloaded
  const sig = S.runs.map((r) => r.id + r.status).join();
  if (sig !== refreshRuns.last) { refreshRuns.last = sig; await refreshModels(); }
  for (const r of S.runs) if (wanted(r.id) && ACTIVE.has(r.status) && !S.streams.has(r.id)) subscribe(r.id);
}

function selectRun(id, makeCurrent = true) {
  S.selected.add(id);
  if (makeCurrent) S.current = id;
  subscribe(id);
  renderRuns();
  redrawCharts();
  if ($("#log-box").open) loadLog();
}

function unselectRun(id) {
  S.selected.delete(id);
  const es = S.streams.get(id);
  if (es && !wanted(id)) { es.close(); S.streams.delete(id); }
  if (S.current === id) S.current = [...S.selected].pop() ?? null;
  renderRuns();
  redrawCharts();
}

// Live metrics over Server-Sent Events: the stream first replays what the run has logged, then follows it.
function subscribe(id) {
  if (S.streams.has(id)) return;
  S.metrics.set(id, []);
  const es = new EventSource(withToken(`/api/v1/runs/${id}/events`));
  S.streams.set(id, es);
  es.addEventListener("metric", (e) => {
    const m = JSON.parse(e.data), list = S.metrics.get(id) || [];
    // a continued run's steps go on from its parent's: plotted at the model's step (run_step: the run's own)
    m.run_step = m.step;
    m.step += (S.runs.find((r) => r.id === id) || {}).step_offset || 0;
    while (list.length && list[list.length - 1].step >= m.step) list.pop();  // re-logged after a resume
    list.push(m);
    S.metrics.set(id, list);
    scheduleRedraw();
  });
  es.addEventListener("reset", () => { S.metrics.set(id, []); scheduleRedraw(); });
  es.addEventListener("status", (e) => {
    const r = JSON.parse(e.data), i = S.runs.findIndex((x) => x.id === r.id);
    if (i >= 0) { S.runs[i] = r; renderRuns(); }
  });
  es.addEventListener("end", () => { es.close(); S.streams.delete(id); refreshRuns(); });
}

let redrawPending = false;
function scheduleRedraw() {
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => { redrawPending = false; redrawCharts(); });
}

function redrawCharts() {
  // an experiment has no metrics stream: its numbers are in its report
  drawCharts([...S.selected].map((id) => ({ id, color: runColor(id), metrics: S.metrics.get(id) || [],
                                            kind: S.runs.find((r) => r.id === id)?.kind ?? "train" }))
    .filter((r) => r.kind !== "experiment" && r.kind !== "eval"), t, chartEmpty([...S.selected]));
  metricsChanged();
  renderTuneCharts();
}

// One chart of one run for its page (runpage.js): `key` is a metric (loss draws val_loss too, dashed).
const PAGE_CHARTS = { loss: "loss", tokens_per_s: "tps", reward: "reward", kl: "kl" };
function runChart(el, id, key, empty) {
  const kind = S.runs.find((r) => r.id === id)?.kind ?? "train";
  drawChartInto(el, PAGE_CHARTS[key], [{ id, color: runColor(id), metrics: S.metrics.get(id) || [], kind }], t, empty);
}

const pendingActions = new Set();  // a double click sends one request (the second found the run queued: an error)

async function runAction(id, action) {
  const key = `${id}/${action}`;
  if (pendingActions.has(key)) return;
  pendingActions.add(key);
  try {
    const run = await api("POST", `/api/v1/runs/${id}/${action}`, action === "resume" ? {} : undefined);
    if (action === "restart") toast(startedOrQueued(run, "runs.restarted", { old: id }));  // a new run: say which
    const es = S.streams.get(id);
    if (es) { es.close(); S.streams.delete(id); }
    await refreshRuns();
    if (wanted(id)) subscribe(id);
  } catch (e) { toast(e.message, true); }
  finally { pendingActions.delete(key); }
}

async function deleteRun(id) {
  if (!confirm(t("runs.confirm_delete", { id }))) return;
  try { await api("DELETE", `/api/v1/runs/${id}`); unselectRun(id); await refreshRuns(); }
  catch (e) { toast(e.message, true); }
}

async function loadLog(id = S.current, el = $("#run-log")) {  // the last lines of a run's process output
  if (id == null) return;
  try { el.textContent = (await api("GET", `/api/v1/runs/${id}/log?lines=200`)).lines.join("\n"); }
  catch (e) { el.textContent = e.message; }
}

// ---- generation ------------------------------------------------------------------------------------

function renderGenModels() {
  const sel = $("#gen-model"), keep = sel.value, trained = S.models.filter((m) => m.trained);
  sel.replaceChildren(...trained.map((m) => h("option", { value: m.name, text: m.name })));
  if (trained.some((m) => m.name === keep)) sel.value = keep;
  fillVersions($("#gen-version"), sel.value);
  fillSteering(sel.value);
  $("#gen-go").disabled = !trained.length;
  if (!trained.length) setMsg($("#gen-msg"), t("gen.no_models"), false);
  else if ($("#gen-msg").textContent === t("gen.no_models")) $("#gen-msg").textContent = "";
}

function genRequest() {
  const num = (id, parse = parseFloat) => parse($(id).value);
  const body = {
    model: $("#gen-model").value, prompt: $("#gen-prompt").value, max_new_tokens: num("#g-max_new_tokens", parseInt),
    temperature: num("#g-temperature"), top_k: num("#g-top_k", parseInt), top_p: num("#g-top_p"),
    repetition_penalty: num("#g-repetition_penalty"), num_beams: num("#g-num_beams", parseInt),
    length_penalty: num("#g-length_penalty"), do_sample: !$("#g-greedy").checked,
    stop_strings: $("#g-stop").value.split("\n").filter((s) => s.length),
  };
  if ($("#g-seed").value !== "") body.seed = parseInt($("#g-seed").value, 10);
  return { ...body, ...versionParams($("#gen-version").value), ...steerParams() };
}

let genAbort = null;

async function streamGenerate(body, out) {
  genAbort = new AbortController();
  const headers = { "Content-Type": "application/json", ...apiHeaders() };
  const res = await fetch("/api/v1/generate/stream", { method: "POST", headers, body: JSON.stringify(body), signal: genAbort.signal });
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new Error(problemText(data) || res.statusText);
  }
  const reader = res.body.getReader(), dec = new TextDecoder();
  let buf = "", done = null;
  for (;;) {
    const { value, done: eof } = await reader.read();
    if (eof) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = (frame.match(/^event: (.*)$/m) || [])[1], raw = (frame.match(/^data: (.*)$/m) || [])[1];
      if (!raw) continue;
      const data = JSON.parse(raw);
      if (ev === "token") out.textContent += data.text;
      else if (ev === "done") done = data;
      else if (ev === "error") throw new Error(data.detail);
    }
  }
  return done;
}

function setupGenerate() {
  for (const id of ["g-temperature", "g-top_p", "g-repetition_penalty"]) {
    const input = $("#" + id), output = $(`output[for="${id}"]`);
    const sync = () => { output.textContent = input.value; };
    input.addEventListener("input", sync);
    sync();
  }
  $("#gen-stop").addEventListener("click", () => genAbort && genAbort.abort());
  $("#gen-model").addEventListener("change", () => { fillVersions($("#gen-version"), $("#gen-model").value); fillSteering($("#gen-model").value); });
  initSteering();
  $("#gen-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = genRequest(), out = $("#gen-output"), msg = $("#gen-msg");
    $("#gen-prompt-echo").textContent = body.prompt;
    out.textContent = "";
    msg.textContent = "";
    $("#gen-go").disabled = true;
    $("#gen-stop").disabled = false;
    try {
      let stats;
      if ($("#g-stream").checked && body.num_beams === 1) {
        stats = await streamGenerate(body, out);
      } else {
        if ($("#g-stream").checked) setMsg(msg, t("gen.beams_no_stream"));
        stats = await api("POST", "/api/v1/generate", body);
        out.textContent = stats.text;
      }
      if (stats) setMsg(msg, t("gen.stats", { tokens: stats.new_tokens, secs: stats.elapsed_s.toFixed(2), tps: fmtNum(Math.round(stats.tokens_per_s)) }));
    } catch (e) {
      if (e.name !== "AbortError") setMsg(msg, "✗ " + e.message, false);
    } finally {
      $("#gen-go").disabled = false;
      $("#gen-stop").disabled = true;
      genAbort = null;
    }
  });
}

// ---- start -----------------------------------------------------------------------------------------

function renderAll() {
  if (!S.info) return;
  renderBooks(); renderModels(); renderRuns(); renderTrainForm(); renderGenModels(); renderSelfPlayForm(); renderChat(); redrawCharts();
  scheduleEstimate();
}

async function main() {
  $("#lang").addEventListener("change", () => { lang = $("#lang").value; localStorage.setItem("lmlab.lang", lang); applyLanguage(); });
  for (const b of $$("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#log-box").addEventListener("toggle", () => { if ($("#log-box").open) loadLog(); });
  try {
    [S.info, S.presets] = await Promise.all([api("GET", "/api/v1/info"), api("GET", "/api/v1/presets")]);
  } catch (e) { toast(e.message, true); return; }
  setupDropzone();
  setupModelForm();
  setupTrainForm();
  setupSelfPlayForm();
  setupLabForm();
  setupGenerate();
  initEvaluate({ S, t, h, api, startedOrQueued, withToken, statusLabel, refreshRuns, deleteRun, runAction, toast, fmtLoss, ACTIVE, COLORS });
  initModelPage({ S, t, h, api, startedOrQueued, fmtNum, fmtBytes, statusLabel, refreshRuns, runAction, toast, ACTIVE });
  initChat({ S, t, h, api, apiHeaders, toast });
  initTune({ S, t, h, api, problemText, startedOrQueued, apiHeaders, statusLabel, refreshRuns, deleteRun, runAction, toast, subscribe, fmtNum, fmtBytes, ACTIVE, COLORS });
  initData({ S, t, h, api, fmtNum, toast, COLORS });
  initRunPage({ S, t, h, api, fmtNum, fmtBytes, fmtLoss, statusLabel, labName, subscribe, runChart, showTab, toast, renderRuns });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  setupUx({ t, api, S, h, showTab, openRun: async (run) => {
    await Promise.all([refreshBooks(), refreshModels(), refreshRuns()]);
    S.selected.clear();
    selectRun(run.id);
    showTab("runs");
  } });
  await Promise.all([refreshBooks(), refreshModels(), refreshRuns()]);
  applyLanguage();
  const start = location.hash.slice(1) || (!S.books.length ? "books" : !S.models.length ? "models" : "runs");
  showTab(start);
  setInterval(() => {
    refreshRuns().catch(() => {});
    if ($("#log-box").open && !$("#tab-runs").hidden) loadLog();
    if (!$("#tab-lab").hidden && $("#lab-log-box").open) loadLabLog();
  }, 2000);
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(redrawCharts, 150); });
  document.body.dataset.ready = "true";
}

main();
