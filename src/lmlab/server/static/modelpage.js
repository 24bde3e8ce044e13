// A model's page (#model/NAME): its card (GET /api/v1/models/NAME/card: size on disk, bits per weight,
// parameters, how it was made, tokens/s measured on request by POST .../speed) and the actions that make a new
// model from it as a job of the server's supervisor (closing the page stops nothing, Cancel does). ACTIONS holds
// one entry per kind of job: quantization (`lmlab quantize`); a merge is one more entry there. Below them, "Look
// inside" (interp.js): the interpretability lab's views of the model on a prompt.

import { interpSection } from "/static/interp.js";
import { mergeForm, mergeLabel, mergeable, startJob } from "/static/mergeform.js";
import { keepFields, runErrorText } from "/static/ux.js";

let A = null;  // app.js: { S, t, h, api, fmtNum, fmtBytes, statusLabel, refreshRuns, runAction, toast, ACTIVE }
const P = { name: null, card: null, error: null, stamp: null, sigs: {} };
const $ = (s) => document.querySelector(s);

// the runs that make a model from others (commands.DERIVED on the server); the runs table names them "A → B"
export const DERIVED_KINDS = ["quantize", "merge"];
export const derivedName = (r) => `${r.model} → ${r.params.new_model}`;

// One entry per action: its title, whether the model allows it (else the reason, an i18n key), its form.
const ACTIONS = [
  { kind: "quantize", title: "mp.quantize", form: quantizeForm,
    problem: (m, card) => (!m.trained ? "mp.need_trained" : card && card.weights !== "fp32" ? "mp.already_quantized" : null) },
  { kind: "merge", title: "mp.merge", form: (m) => mergeForm(A, m),
    problem: (m, card) => (!m.trained ? "mp.merge_need_trained" : card && card.weights !== "fp32" ? "mp.merge_quantized" : null) },
];

export function initModelPage(app) {
  A = app;
}

export function openModel(name) {
  if (P.name !== name) Object.assign(P, { name, card: null, error: null, stamp: null, sigs: {} });
  renderModelPage();
}

async function loadCard() {
  const name = P.name;
  let card = null, error = null;
  try { card = await A.api("GET", `/api/v1/models/${encodeURIComponent(name)}/card`); }
  catch (e) { error = e.message; }
  if (P.name !== name) return;  // another model's page opened meanwhile: this answer is not its card
  Object.assign(P, { card, error });
  renderModelPage();
}

const fmtBits = (b) => (b == null ? "—" : (Math.round(b * 1000) / 1000).toString());

function madeText(made) {
  const t = A.t, run = made.run ? ` (#${made.run})` : "";
  if (made.how === "merged") return t("mp.made_merged", { from: made.from.join(" + "), method: made.method }) + run;
  if (made.how === "quantized") return t("mp.made_quantized", { from: made.from ?? "?" }) + run;
  if (made.how === "selfplay") return t("mp.made_selfplay", { from: made.from, reward: made.reward ?? "" }) + run;
  if (made.how === "tuned") return t("mp.made_tuned", { mode: made.mode, from: made.from ?? "?" }) + run;
  if (made.how === "trained") return (made.steps == null ? t("mp.made_by_hand") : t("mp.made_trained", { steps: A.fmtNum(made.steps) })) + run;
  return t("mp.made_untrained");
}

// the number, and how it was measured in a smaller line
function speedText(s) {
  if (!s) return A.t("mp.not_measured");
  const when = new Date(s.measured_at * 1000).toLocaleString(document.documentElement.lang === "ru" ? "ru-RU" : "en-US");
  return A.h("span", {}, A.t("mp.speed", { tps: A.fmtNum(s.tokens_per_s) }),
    A.h("span", { class: "how", text: A.t("mp.speed_how", { tokens: s.new_tokens, threads: s.threads, when }) }));
}

async function measure(button) {
  const msg = $("#mp-speed-msg"), focused = document.activeElement === button;
  button.disabled = true;
  msg.textContent = A.t("mp.measuring");
  try { P.card = await A.api("POST", `/api/v1/models/${encodeURIComponent(P.name)}/speed`); msg.textContent = ""; }
  catch (e) { msg.textContent = "✗ " + e.message; }
  button.disabled = false;
  renderModelPage();
  if (focused) $("#mp-measure")?.focus();  // the card is drawn anew with the measurement
}

function fact(label, text, id, ...extra) {
  return A.h("div", { class: "fact fact-" + id, "data-fact": id }, A.h("dt", { text: A.t(label) }), A.h("dd", {}, text, ...extra));
}

// a part of the page drawn again only when what it shows changed (the runs are refreshed every 2 s): a form
// being filled in, or a focused button, stays as it is, and so does what a form's message said
function part(id, sig, make) {
  if (P.sigs[id] === sig) return;
  P.sigs[id] = sig;
  const said = [...$("#" + id).querySelectorAll(".msg[id]")].map((e) => [e.id, e.textContent, e.className]);
  keepFields($("#" + id), make());  // what was filled in stays, in the new language too
  for (const [msg, text, cls] of said) Object.assign(document.getElementById(msg) || {}, { textContent: text, className: cls });
}

export function renderModelPage() {
  const root = $("#model-page");
  if (!A || !root || !P.name || $("#tab-model").hidden) return;
  const { S, t, h } = A, m = S.models.find((x) => x.name === P.name), lang = t("mp.title");
  if (!m) {
    root.dataset.name = "";
    root.replaceChildren(h("h2", { id: "mp-title", text: t("mp.title", { name: P.name }) }),
      h("p", { class: "bad", text: t("mp.gone", { name: P.name }) }), h("a", { href: "#models", text: t("rp.back_models") }));
    return;
  }
  if (root.dataset.name !== P.name) {
    root.dataset.name = P.name;
    P.sigs = {};
    root.replaceChildren(h("div", { id: "mp-head" }), h("div", { id: "mp-card-box" }),
      h("p", { id: "mp-speed-msg", class: "msg", "aria-live": "polite" }), h("div", { id: "mp-actions" }), h("div", { id: "mp-jobs-box" }),
      h("section", { class: "card", id: "mp-interp", "aria-labelledby": "mp-h-interp" }));
  }
  // the card again when the model changed (trained, quantized from, measured elsewhere): its row's updated_at tells
  if (P.stamp !== `${m.updated_at}`) { P.stamp = `${m.updated_at}`; loadCard(); }
  part("mp-head", lang + m.name, () => [h("div", { class: "rp-head" }, h("h2", { id: "mp-title", text: t("mp.title", { name: m.name }) }),
    h("span", { class: "grow" }), h("a", { href: "#models", class: "back", text: t("rp.back_models") }))]);
  const c = P.card;
  part("mp-card-box", JSON.stringify([lang, c, P.error, m.parameters]), () => [h("dl", { class: "facts card", id: "mp-card" },
    fact("col.params", A.fmtNum(c ? c.parameters : m.parameters), "parameters"),
    fact("mp.size", c ? A.fmtBytes(c.size_bytes) : "—", "size"),
    fact("mp.weights", c ? c.weights : "—", "weights"),
    fact("mp.bpw", c ? fmtBits(c.bits_per_weight) + (c.quantized_bits_per_weight != null ? " · " + t("mp.bpw_linears", { bits: fmtBits(c.quantized_bits_per_weight) }) : "") : "—", "bpw"),
    fact("mp.made", c ? madeText(c.made) : "—", "made"),
    fact("mp.chat", c ? t(c.chat ? "mp.chat_yes" : "mp.chat_no") : "—", "chat"),
    fact("mp.tps", c ? speedText(c.speed) : "—", "tps", " ",
      c && c.trained ? h("button", { type: "button", class: "secondary", id: "mp-measure", onclick: (e) => measure(e.target), text: t("mp.measure") }) : null)),
    ...(P.error ? [h("div", { class: "error", text: P.error })] : [])]);
  // the forms: once the card is known, then again only when the model, language, availability, list of books or
  // models to merge with change (what was filled in is kept: part)
  const problems = ACTIONS.map((a) => a.problem(m, c)), known = c != null || P.error != null;
  part("mp-actions", JSON.stringify([lang, m.name, problems, S.books.map((b) => b.name), mergeable(S, m).map((x) => x.name), known]), () => !known
    ? [h("p", { class: "muted", id: "mp-actions-loading", text: t("rp.loading") })]
    : ACTIONS.map((a, i) => h("section", { class: "card", id: "mp-action-" + a.kind, "aria-labelledby": "mp-h-" + a.kind },
      h("h3", { id: "mp-h-" + a.kind, text: t(a.title) }),
      problems[i] ? h("p", { class: "muted", text: t(problems[i]) }) : a.form(m))));
  part("mp-interp", JSON.stringify([lang, m.name, m.trained]), () => [h("h3", { id: "mp-h-interp", text: t("ip.title") }),
    ...(m.trained ? interpSection(A, m) : [h("p", { class: "muted", text: t("ip.need_trained") })])]);
  const runs = S.runs.filter((r) => DERIVED_KINDS.includes(r.kind) && r.model === m.name);
  part("mp-jobs-box", JSON.stringify([lang, runs.map((r) => [r.id, r.status, r.cancel_requested, r.error]), S.models.map((x) => x.name)]), () => [jobs(runs)]);
}

// the runs that made (or make) a model from this one, newest first
function jobs(runs) {
  const { S, t, h } = A;
  if (!runs.length) return h("p", { class: "muted", id: "mp-jobs-empty", text: t("mp.no_jobs") });
  return h("table", { id: "mp-jobs", class: "grid", tabindex: "0" },
    h("thead", {}, h("tr", {}, h("th", { text: "#" }), h("th", { text: t("mp.new_model") }), h("th", { text: t("col.status") }), h("th", {}, h("span", { class: "sr-only", text: t("runs.actions") })))),
    h("tbody", {}, ...runs.map((r) => {
      const made = r.status === "completed" && S.models.some((x) => x.name === r.params.new_model);
      return h("tr", { "data-run": r.id, "data-status": r.status },
        h("td", {}, h("a", { href: `#run/${r.id}`, class: "run-link", text: `#${r.id}` })),
        h("td", {}, made ? h("a", { href: `#model/${encodeURIComponent(r.params.new_model)}`, class: "model-link", text: r.params.new_model }) : r.params.new_model,
          h("span", { class: "kind", text: r.kind === "merge" ? mergeLabel(r.params) : quantLabel(r.params) })),
        h("td", {}, h("span", { class: "badge " + r.status, text: A.statusLabel(r) }), r.error ? h("div", { class: "error", text: runErrorText(r.error) }) : null),
        h("td", {}, A.ACTIVE.has(r.status) && !r.cancel_requested ? h("button", { type: "button", class: "danger cancel", text: t("runs.cancel"), onclick: () => A.runAction(r.id, "cancel") }) : null));
    })));
}

const quantLabel = (p) => `${p.to}${p.group_size ? " g" + p.group_size : ""} ${p.method}${p.keep_head ? " · head fp32" : ""}`;

// ---- quantization -----------------------------------------------------------------------------------

function quantizeForm(m) {
  const { S, t, h } = A, label = (key, ...control) => h("label", {}, h("span", { text: t(key) }), ...control);
  const form = h("form", { id: "mp-quantize-form", class: "form-grid", autocomplete: "off", onsubmit: (e) => { e.preventDefault(); startQuantize(m); } },
    label("mp.new_model", h("input", { id: "mp-new_model", required: true, maxlength: "100", value: `${m.name}-int8` })),
    label("mp.to", h("select", { id: "mp-to", onchange: sync },
      h("option", { value: "int8", text: t("mp.to_int8") }), h("option", { value: "int4", text: t("mp.to_int4") }))),
    label("mp.group_size", h("select", { id: "mp-group_size" }, ...[32, 64, 128].map((g) => h("option", { value: g, text: g })))),
    label("mp.method", h("select", { id: "mp-method", onchange: sync },
      h("option", { value: "rtn", text: t("mp.method_rtn") }), h("option", { value: "gptq", text: t("mp.method_gptq") }))),
    h("label", { class: "check" }, h("input", { type: "checkbox", id: "mp-keep_head" }), " ", h("span", { text: t("mp.keep_head") })),
    h("fieldset", { class: "wide", id: "mp-calibration" }, h("legend", { text: t("mp.calibration") }),
      h("div", { class: "checks" }, ...(S.books.length ? S.books.map((b) => h("label", { class: "check" },
        h("input", { type: "checkbox", value: b.name, name: "calibration" }), " " + b.name)) : [h("p", { class: "muted", text: t("train.no_books") })]))),
    h("div", { class: "actions wide" }, h("button", { type: "submit", id: "mp-quantize", text: t("mp.start") }),
      h("span", { id: "mp-msg", class: "msg", "aria-live": "polite" })),
    h("p", { class: "muted wide", text: t("mp.quantize_note") }));
  // the new name follows the format until it is typed in
  let named = false;
  form.querySelector("#mp-new_model").addEventListener("input", () => { named = true; });
  function sync() {
    const int4 = form.querySelector("#mp-to").value === "int4", gptq = form.querySelector("#mp-method").value === "gptq";
    form.querySelector("#mp-group_size").disabled = !int4;
    for (const box of form.querySelectorAll("#mp-calibration input")) box.disabled = !gptq;
    if (!named) form.querySelector("#mp-new_model").value = `${m.name}-${int4 ? "int4" : "int8"}`;
  }
  queueMicrotask(sync);
  return form;
}

async function startQuantize(m) {
  const f = (id) => $("#mp-" + id), to = f("to").value, method = f("method").value, msg = f("msg");
  const calibration = method === "gptq" ? [...document.querySelectorAll("#mp-calibration input:checked")].map((x) => x.value) : [];
  const body = { model: m.name, new_model: f("new_model").value.trim(), to, method, calibration, keep_head: f("keep_head").checked };
  if (to === "int4") body.group_size = +f("group_size").value;
  await startJob(A, "/api/v1/runs/quantize", body, msg, "mp.started");
}
