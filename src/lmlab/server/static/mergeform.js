// The merge action of a model's page (modelpage.js ACTIONS): `lmlab merge` of this model and the chosen other
// trained model(s) as a job (POST /api/v1/runs/merge); the server refuses parents that cannot merge, with why.

const METHODS = ["linear", "slerp", "task-arithmetic", "ties", "dare"];
const NEEDS_BASE = ["task-arithmetic", "ties", "dare"];

export const mergeLabel = (p) => `${p.method}${p.base ? " · base " + p.base : ""}${p.t != null ? " · t " + p.t : ""}${p.density != null ? " · density " + p.density : ""}`;

// the models `m` can be merged with: trained, and not quantized (the server refuses quantized parents)
export const mergeable = (S, m) => S.models.filter((x) => x.trained && x.name !== m.name && x.origin?.kind !== "quantize");

export function mergeForm(A, m) {
  const { S, t, h } = A, label = (key, ...control) => h("label", {}, h("span", { text: t(key) }), ...control);
  const others = mergeable(S, m);
  const num = (id, value, step) => h("input", { id: "mpm-" + id, type: "number", step, value });
  const form = h("form", { id: "mp-merge-form", class: "form-grid", autocomplete: "off", onsubmit: (e) => { e.preventDefault(); start(A, m, form); } },
    label("mp.new_model", h("input", { id: "mpm-new_model", required: true, maxlength: "100", value: `${m.name}-merged` })),
    label("mp.method", h("select", { id: "mpm-method", onchange: sync }, ...METHODS.map((x) => h("option", { value: x, text: x })))),
    h("fieldset", { class: "wide", id: "mpm-others" }, h("legend", { text: t("mp.merge_with") }),
      h("div", { class: "checks" }, ...(others.length ? others.map((x) => h("label", { class: "check" },
        h("input", { type: "checkbox", value: x.name, name: "others" }), " " + x.name)) : [h("p", { class: "muted", text: t("mp.merge_no_others") })]))),
    label("mp.merge_base", h("select", { id: "mpm-base" }, ...others.map((x) => h("option", { value: x.name, text: x.name })))),
    label("mp.merge_t", num("t", "0.5", "0.05")),
    label("mp.merge_weights", h("input", { id: "mpm-weights", placeholder: "1,1" })),
    label("mp.merge_density", num("density", "1", "0.05")),
    label("mp.merge_lambda", num("lambda", "1", "0.1")),
    label("mp.merge_seed", num("seed", "0", "1")),
    h("div", { class: "actions wide" }, h("button", { type: "submit", id: "mp-merge", text: t("mp.merge_start") }),
      h("span", { id: "mpm-msg", class: "msg", "aria-live": "polite" })),
    h("p", { class: "muted wide", text: t("mp.merge_note") }));
  function sync() {
    const method = form.querySelector("#mpm-method").value;
    form.querySelector("#mpm-base").disabled = !NEEDS_BASE.includes(method);
    form.querySelector("#mpm-t").disabled = method !== "slerp";
    form.querySelector("#mpm-density").disabled = !["ties", "dare"].includes(method);
    form.querySelector("#mpm-lambda").disabled = !NEEDS_BASE.includes(method);
    form.querySelector("#mpm-seed").disabled = method !== "dare";
  }
  queueMicrotask(sync);
  return form;
}

async function start(A, m, form) {
  const f = (id) => form.querySelector("#mpm-" + id), method = f("method").value, msg = f("msg");
  const body = { model: m.name, new_model: f("new_model").value.trim(), method,
    others: [...form.querySelectorAll("#mpm-others input:checked")].map((x) => x.value) };
  if (f("weights").value.trim()) {
    // each weight named if it is not a number ("1,x"), before anything is sent (JSON would send it as null)
    const weights = f("weights").value.split(",").map((x) => x.trim()), bad = weights.find((x) => x === "" || !Number.isFinite(Number(x)));
    if (bad != null) {
      msg.textContent = "✗ " + A.t("err.number", { field: A.t("mp.merge_weights"), input: bad });
      msg.className = "msg bad";
      return;
    }
    body.weights = weights.map(Number);
  }
  for (const key of ["base", "t", "density", "lambda", "seed"]) {
    if (!f(key).disabled && f(key).value !== "") body[key] = key === "base" ? f(key).value : Number(f(key).value);
  }
  await startJob(A, "/api/v1/runs/merge", body, msg, "mp.merge_started");
}

// POST a job from a model page form (merge here, quantize in modelpage.js) and say in `msg` how it went.
const starting = new Set();  // the routes with a start in flight: a double click sends one request, not two

export async function startJob(A, path, body, msg, startedKey) {
  if (starting.has(path)) return;
  starting.add(path);
  try {
    const run = await A.api("POST", path, body);
    msg.textContent = A.startedOrQueued(run, startedKey, { name: body.new_model });
    msg.className = "msg ok";
    await A.refreshRuns();
  } catch (e) {
    msg.textContent = "✗ " + e.message;
    msg.className = "msg bad";
  } finally {
    starting.delete(path);
  }
}
