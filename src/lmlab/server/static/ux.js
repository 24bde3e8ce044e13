// The guided start (a one-click demo and the steps upload → model → train → generate), errors in words that
// name the form field, tables that keep keyboard focus when they redraw, and the Generate form's settings
// that do not apply switched off. app.js calls setupUx() once with what these need from it.

let ctx = null;  // { t, api, S, h, showTab, openRun }

export function setupUx(c) {
  ctx = c;
  const guide = ctx.h("section", { id: "guide", class: "card", "aria-labelledby": "guide-title", hidden: true });
  document.querySelector("main").prepend(guide);
  document.querySelector('#tabs button[data-tab="generate"]').addEventListener("click", () => { localStorage.setItem("lmlab.guide.done", "1"); renderGuide(); });
  setupGenerateSwitches();
  // boxes of text that scroll (logs, previews) scroll from the keyboard too (axe-core's scrollable-region-focusable)
  for (const pre of document.querySelectorAll("pre.preview")) pre.tabIndex = 0;
  // a chart drawn as an image is named by its caption (WCAG 1.1.1; axe-core's svg-img-alt)
  for (const img of document.querySelectorAll("figure [role=img]")) {
    const caption = img.closest("figure").querySelector("figcaption");
    if (caption && !img.hasAttribute("aria-labelledby")) {
      caption.id ||= "caption-" + img.id;
      img.setAttribute("aria-labelledby", caption.id);
    }
  }
}

// ---- errors ----------------------------------------------------------------------------------------

// The supervisor's own sentences for how a run stopped (jobs.py _finish), which the API keeps in English: each
// said by its key in the page's language. What a run's process said itself (its `lmlab: error:` line) is shown
// as it is. The process's name (jobs.PROCESS_NAMES) is English: the English strings take it back, the Russian
// ones say "запуск".
const RUN_ERRORS = [
  [/^the server was stopped; (.+)$/s, "runerr.server_stopped", ["then"]],
  [/^its process ended while no server was watching it; (.+)$/s, "runerr.unwatched", ["then"]],
  [/^the (.+) process was killed by (\S+)$/, "runerr.killed", ["process", "signal"]],
  [/^the (.+) process was interrupted$/, "runerr.interrupted", ["process"]],
  [/^resume to continue from the last checkpoint$/, "runerr.then_resume", []],
  [/^this (.+) keeps no checkpoints and cannot be resumed; start it again$/, "runerr.then_not_resumable", ["process"]],
  [/^it stopped before its first checkpoint; start it again$/, "runerr.then_no_checkpoint", []],
  [/^could not start: (.+)$/s, "runerr.could_not_start", ["reason"]],
  [/^(.+?) finished, but its model was not saved: (.+)$/s, "runerr.not_saved", ["process", "reason"]],
  [/^trained, but the model directory could not be updated: (.+)$/s, "runerr.dir_not_updated", ["reason"]],
  [/^the (\S+) exited without writing (.+)$/, "runerr.no_product", ["process", "file"]],
];

export function runErrorText(text) {
  if (!text || !ctx) return text || "";
  for (const [re, key, names] of RUN_ERRORS) {
    const m = re.exec(text);
    if (m) return ctx.t(key, Object.fromEntries(names.map((n, i) => [n, n === "then" ? runErrorText(m[i + 1]) : m[i + 1]])));
  }
  return text;
}

// The form field an API field belongs to: its label in the visible tab (so in the page's language), else
// anywhere on the page, else the field's own name. Inputs are named <form prefix>-<API field>, or carry the
// field as data-field (the Tune form's); these three are neither.
const INPUT_ALIASES = { vocab_size: "vocab", tokenizer_kind: "tokenizer", stop_strings: "stop" };

function fieldLabel(field) {
  const suffix = "-" + (INPUT_ALIASES[field] || field), tab = document.querySelector(".tab:not([hidden])");
  const find = (root) => root && [...root.querySelectorAll("input[id], select[id], textarea[id]")].find((e) => e.id.endsWith(suffix));
  const input = tab?.querySelector(`[data-field="${CSS.escape(field)}"]`) || find(tab) || find(document);
  const label = input && (input.closest("label") || document.querySelector(`label[for="${input.id}"]`));
  if (!label) return field;
  const span = label.querySelector("span");
  return (span ? span.textContent : label.firstChild.textContent).trim() || field;
}

// pydantic's error types (https://docs.pydantic.dev/latest/errors/validation_errors/) -> an i18n key
const ERROR_KEYS = {
  missing: "err.missing", int_parsing: "err.int", int_type: "err.int", int_from_float: "err.int",
  float_parsing: "err.number", float_type: "err.number", greater_than_equal: "err.ge", greater_than: "err.gt",
  less_than_equal: "err.le", less_than: "err.lt", string_too_short: "err.empty", string_too_long: "err.too_long",
  too_short: "err.too_few", too_long: "err.too_many", literal_error: "err.choice", enum: "err.choice",
  bool_parsing: "err.bool", bool_type: "err.bool",
};

// One validation error of FastAPI's 422 body ({loc: ["body", field, index?], type, msg, input, ctx}) in words.
function validationText(e) {
  const t = ctx.t, loc = (e.loc || []).filter((x) => x !== "body");
  const field = loc.length ? fieldLabel(String(loc[0])) : t("err.request");
  const key = ERROR_KEYS[e.type];
  const input = typeof e.input === "string" || typeof e.input === "number" ? String(e.input) : "";
  if (key) return t(key, { field, input, ...(e.ctx || {}) });
  const reason = e.type === "value_error" && e.ctx && e.ctx.error ? String(e.ctx.error) : e.msg;
  return `${field}: ${reason}`;
}

// The text of an API error's `detail`: a sentence from the server, or FastAPI's list of validation errors.
export function errorText(detail) {
  if (!detail) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map(validationText).join("; ");
  return JSON.stringify(detail);
}

// ---- tables that redraw ----------------------------------------------------------------------------

// Replace a table body's rows; the control that had keyboard focus (found again by its row's key attribute
// and its place among the row's controls) has it again afterwards.
export function keepFocus(tbody, rows, key) {
  const active = document.activeElement, row = active && tbody.contains(active) ? active.closest("tr") : null;
  const controls = (tr) => [...tr.querySelectorAll("button, a[href], input, select")];
  const place = row ? [row.getAttribute(key), controls(row).indexOf(active), active.className] : null;
  tbody.replaceChildren(...rows);
  if (!place) return;
  const again = rows.find((tr) => tr.getAttribute(key) === place[0]);
  if (!again) return;
  const list = controls(again), same = list.find((c) => c.className === place[2] && list.indexOf(c) === place[1]);
  (same || list.find((c) => c.className === place[2]) || list[place[1]])?.focus();
}

// ---- forms that redraw ------------------------------------------------------------------------------

// Replace a box's contents (a form drawn again in another language, or for a new list of books or models)
// keeping what had been chosen or typed into it: each field is found again by its id, a checkbox without one by
// its name and value. Choices go back first, with a change event (the form's own listeners, which may refill
// other fields, run as on a click), then typed text that differs from what the form now shows, with an input
// event. After the form's own queued set-up, so that it starts from a drawn form.
export function keepFields(box, children) {
  const key = (e) => e.id || (e.name ? `${e.name}=${e.value}` : null), kept = new Map();
  for (const e of box.querySelectorAll("input, select, textarea")) {
    if (key(e) && e.type !== "submit") kept.set(key(e), e.type === "checkbox" || e.type === "radio" ? e.checked : e.value);
  }
  box.replaceChildren(...children);
  if (!kept.size) return;
  queueMicrotask(() => {
    const fields = [...box.querySelectorAll("input, select, textarea")].filter((e) => kept.has(key(e)));
    const choice = (e) => e.tagName === "SELECT" || e.type === "checkbox" || e.type === "radio";
    for (const e of fields.filter(choice)) {
      const was = kept.get(key(e)), now = e.tagName === "SELECT" ? e.value : e.checked;
      if (was === now || (e.tagName === "SELECT" && ![...e.options].some((o) => o.value === was))) continue;
      if (e.tagName === "SELECT") e.value = was; else e.checked = was;
      e.dispatchEvent(new Event("change", { bubbles: true }));
    }
    for (const e of fields.filter((x) => !choice(x))) {
      if (e.value === kept.get(key(e))) continue;
      e.value = kept.get(key(e));
      e.dispatchEvent(new Event("input", { bubbles: true }));
    }
  });
}

// ---- books -----------------------------------------------------------------------------------------

// Tokens per character depend on the tokenizer a model trains; about 4 characters per token is the usual
// figure for byte-level BPE on English (OpenAI's tokenizer guide), and the built-in tales come out near it.
export const tokenEstimate = (chars) => Math.round(chars / 4);

// ---- guided start ----------------------------------------------------------------------------------

export function renderGuide() {
  const { S, t, h, showTab } = ctx, box = document.querySelector("#guide");
  if (!box) return;
  const trained = S.models.some((m) => m.trained), training = S.runs.some((r) => r.kind === "train" && ["queued", "running"].includes(r.status));
  box.hidden = trained && localStorage.getItem("lmlab.guide.done") === "1";
  if (box.hidden) return;
  const steps = [["books", S.books.length > 0], ["models", S.models.length > 0], ["train", trained || training], ["generate", false]];
  const focused = document.activeElement && box.contains(document.activeElement) ? document.activeElement.id : null;
  box.replaceChildren(...[
    h("h2", { id: "guide-title", text: t("guide.title") }),
    S.models.length ? null : h("p", {}, h("button", { type: "button", id: "demo-go", onclick: startDemo, text: t("guide.demo") }), " ",
      h("span", { class: "muted", text: t("guide.demo_note") }), " ", h("span", { id: "demo-msg", class: "msg" })),
    h("ol", { class: "steps" }, ...steps.map(([tab, done], i) => h("li", { class: done ? "done" : "" },
      h("button", { type: "button", class: "secondary", id: `guide-${tab}`, onclick: () => showTab(tab), text: t(`guide.step${i + 1}`) }),
      " ", h("span", { class: "muted", text: (done ? "✓ " : "") + t(`guide.step${i + 1}_note`) }))))].filter((e) => e));
  if (focused) document.getElementById(focused)?.focus();
}

async function startDemo() {
  const button = document.querySelector("#demo-go");
  button.disabled = true;
  try {
    await ctx.openRun(await ctx.api("POST", "/api/v1/demo", {}));
  } catch (e) {
    const msg = document.querySelector("#demo-msg");
    if (msg) { msg.textContent = "✗ " + e.message; msg.className = "msg bad"; }
    button.disabled = false;
  }
}

// ---- generate --------------------------------------------------------------------------------------

// Greedy decoding and beam search take the most likely tokens: temperature, top-k, top-p and the seed do
// not apply; the length penalty applies only to beams; beams cannot stream (the winner is known at the end).
function setupGenerateSwitches() {
  const $ = (s) => document.querySelector(s);
  const sync = () => {
    const beams = (parseInt($("#g-num_beams").value, 10) || 1) > 1, greedy = $("#g-greedy").checked || beams;
    for (const id of ["g-temperature", "g-top_k", "g-top_p", "g-seed"]) $("#" + id).disabled = greedy;
    $("#g-length_penalty").disabled = !beams;
    $("#g-stream").disabled = beams;
  };
  for (const id of ["#g-num_beams", "#g-greedy"]) { $(id).addEventListener("input", sync); $(id).addEventListener("change", sync); }
  sync();
}
