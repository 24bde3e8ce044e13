// Steering in the Generate view: the model's saved steering directions (GET /api/v1/models/NAME/steering, made
// by `lmlab lab interp steer`), added with a coefficient at their layer or projected out of every layer.

import { api, h, t } from "/static/app.js";

// Fill the direction picker with `model`'s directions; keeps the picked one while it is still there.
export async function fillSteering(model) {
  const select = document.querySelector("#g-steer"), ticket = (select.fills = (select.fills || 0) + 1);
  let found = [];
  try { if (model) found = await api("GET", `/api/v1/models/${encodeURIComponent(model)}/steering`); }
  catch { found = []; }  // generation without steering stays possible; the list comes back with the next refresh
  if (select.fills !== ticket) return;  // stale: a later call, for the model picked now, fills it (fillVersions)
  const keep = select.value;  // after the wait: a choice made while the list loaded stays (fillVersions)
  select.replaceChildren(h("option", { value: "", text: t("steer.none") }),
    ...found.map((d) => h("option", { value: d.name,
                                      text: t("steer.option", { name: d.name, layer: d.layer, norm: d.norm.toFixed(2) }) })));
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
  syncSteering();
}

// The coefficient only means something for an added direction.
export function syncSteering() {
  const on = document.querySelector("#g-steer").value !== "", ablate = document.querySelector("#g-steer-ablate");
  ablate.disabled = !on;
  document.querySelector("#g-steer-coef").disabled = !on || ablate.checked;
}

// The request fields: {} without a direction.
export function steerParams() {
  const name = document.querySelector("#g-steer").value;
  if (!name) return {};
  if (document.querySelector("#g-steer-ablate").checked) return { steer: name, steer_ablate: true };
  return { steer: name, steer_coef: parseFloat(document.querySelector("#g-steer-coef").value) };
}

export function initSteering() {
  document.querySelector("#g-steer").addEventListener("change", syncSteering);
  document.querySelector("#g-steer-ablate").addEventListener("change", syncSteering);
  syncSteering();
}
