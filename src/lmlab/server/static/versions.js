// Versions of a model: every run keeps its final model and its checkpoints (GET /api/v1/models/NAME/versions);
// any of them can be picked to download, export or generate from (?run=N[&step=S] or {run, step}). Lineage:
// a model's runs, newest first, each continuing the one after it.

import { api, h, t, withToken } from "/static/app.js";

// an option's value: "" (the model's current weights), "RUN" (that run's final model) or "RUN:STEP"
export function versionParams(value) {
  if (!value) return {};
  const [run, step] = value.split(":").map(Number);
  return step === undefined ? { run } : { run, step };
}

const versionQuery = (value) => new URLSearchParams(versionParams(value)).toString();

function versionLabel(v) {
  const sp = v.kind === "selfplay" ? "versions.sp_" : "versions.";  // lineage: "self-play run N: ..."
  return v.step == null ? t(sp + "final", { run: v.run, steps: v.steps })
    : t(sp + "checkpoint", { run: v.run, step: v.step, steps: v.steps });
}

// Fill `select` with the model's versions, newest first; keeps the picked one while it is still there.
export async function fillVersions(select, model) {
  const ticket = (select.fills = (select.fills || 0) + 1);
  let versions = [];
  try { if (model) versions = await api("GET", `/api/v1/models/${encodeURIComponent(model)}/versions`); }
  catch { versions = []; }  // the current weights stay selectable; the list comes back with the next refresh
  if (select.fills !== ticket) return;  // a later call (another model picked meanwhile) fills it: this answer is stale
  // what is chosen now, after the wait: a choice made while the list loaded (a refresh runs every few seconds)
  // is kept, not reset to the value from before the wait
  const keep = select.value;
  select.replaceChildren(h("option", { value: "", text: t("versions.current") }),
    ...versions.filter((v) => !v.current).reverse().map((v) =>
      h("option", { value: v.step == null ? `${v.run}` : `${v.run}:${v.step}`, text: versionLabel(v) })));
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
}

// A picker for a models-table row: changing it points the row's download and export links at that version. The
// table is drawn anew when runs change: the version picked in a row is kept here and picked again in its new row.
const picked = new Map();

export function versionPicker(model) {
  const select = h("select", { class: "version", "aria-label": t("versions.pick", { name: model.name }),
                               onchange: () => { picked.set(model.name, select.value); retarget(select, model.name); } });
  fillVersions(select, model.name).then(() => {
    const want = picked.get(model.name);
    if (want && select.value !== want && [...select.options].some((o) => o.value === want)) {
      select.value = want;
      retarget(select, model.name);
    }
  });
  return select;
}

function retarget(select, name) {
  const q = versionQuery(select.value), p = versionParams(select.value);
  const label = p.run == null ? name : `${name}-run${p.run}` + (p.step == null ? "" : `-step${p.step}`);
  const base = `/api/v1/models/${encodeURIComponent(name)}`;
  for (const [cls, path, file] of [["download", "/download", ".zip"], ["export-hf", "/export/hf", "-hf.zip"],
                                   ["export-gguf", "/export/gguf", ".gguf"]]) {
    const a = select.parentElement.querySelector("a." + cls);
    if (!a) continue;
    a.href = withToken(base + path + (q ? "?" + q : ""));
    a.download = label + file;
  }
}

// "runs #5 ← #3": the runs whose weights the model's current ones continue (shown when there is more than one)
export function lineageText(m) {
  return m.lineage && m.lineage.length > 1 ? t("versions.lineage", { runs: m.lineage.map((id) => "#" + id).join(" ← ") }) : null;
}

// Training a trained model from scratch makes a new version: asked first (the server refuses it otherwise).
// Returns the request to send, or null when the user declines.
export function confirmNewVersion(body, model) {
  if (!model || !model.trained || body.init_from_trained) return body;
  const ask = { name: model.name, id: model.trained_run_id ?? "—", steps: model.trained_steps ?? "—" };  // none: weights put there by hand
  if (!confirm(t("versions.confirm_new", ask))) return null;
  return { ...body, new_version: true };
}
