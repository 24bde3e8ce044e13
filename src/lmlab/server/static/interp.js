// "Look inside" on a model's page (modelpage.js): the interpretability lab's views of the model on a prompt,
// computed by the server on request (POST /api/v1/models/NAME/interp; the numbers `lmlab lab interp` writes):
// the logit lens (each residual stream read through the final norm and head: its top token per position, the
// cell shaded by the target token's probability), one head's attention (query × key), and activation patching
// (the restored share of the target's logit difference when the clean stream is put back at one place); and
// the feature browser of the sparse autoencoders saved beside the model.

const I = { result: null, head: [0, 0] };  // the last view shown, kept while the page is drawn again

export function interpSection(A, m) {
  const { t, h } = A, label = (key, ...control) => h("label", {}, h("span", { text: t(key) }), ...control);
  const form = h("form", { id: "ip-form", class: "form-grid", autocomplete: "off", onsubmit: (e) => { e.preventDefault(); look(A, m, form); } },
    label("ip.view", h("select", { id: "ip-view", onchange: () => sync(form) },
      ...["lens", "attention", "patch"].map((v) => h("option", { value: v, text: t("ip.view_" + v) })))),
    h("label", { class: "wide" }, h("span", { text: t("ip.prompt") }), h("input", { id: "ip-prompt", required: true, maxlength: "2000", value: "Once upon a time" })),
    h("label", { class: "wide ip-patch" }, h("span", { text: t("ip.corrupt") }), h("input", { id: "ip-corrupt", maxlength: "2000" })),
    label("ip.target", h("input", { id: "ip-target", maxlength: "200", placeholder: t("ip.target_default") })),
    h("label", { class: "check" }, h("input", { type: "checkbox", id: "ip-bos" }), " ", h("span", { text: t("ip.bos") })),
    h("div", { class: "actions wide" }, h("button", { type: "submit", id: "ip-go", text: t("ip.go") }),
      h("span", { id: "ip-msg", class: "msg", "aria-live": "polite" })),
    h("p", { class: "muted wide", text: t("ip.note") }));
  queueMicrotask(() => sync(form));
  const out = h("div", { id: "ip-out" });
  if (I.result && I.result.model === m.name) queueMicrotask(() => show(A, I.result));
  return [form, out, saeBlock(A, m)];
}

// ---- the sparse autoencoders saved beside the model (lmlab lab interp sae): a feature browser over a book

function saeBlock(A, m) {
  const { t, h, S } = A, label = (key, ...control) => h("label", {}, h("span", { text: t(key) }), ...control);
  const box = h("div", { id: "ip-sae" }, h("h4", { text: t("ip.sae_title") }), h("p", { class: "muted", id: "ip-sae-none", text: t("ip.sae_loading") }));
  const form = h("form", { id: "ip-sae-form", class: "form-grid", autocomplete: "off", hidden: true, onsubmit: (e) => { e.preventDefault(); browse(A, m, form); } },
    label("ip.sae", h("select", { id: "ip-sae-name" })),
    label("ip.sae_book", h("select", { id: "ip-sae-book" }, ...S.books.map((b) => h("option", { value: b.name, text: b.name })))),
    label("ip.sae_features", h("input", { id: "ip-sae-features", maxlength: "200", placeholder: t("ip.sae_features_hint") })),
    h("div", { class: "actions wide" }, h("button", { type: "submit", id: "ip-sae-go", text: t("ip.sae_go") }),
      h("span", { id: "ip-sae-msg", class: "msg", "aria-live": "polite" })));
  box.append(form, h("div", { id: "ip-sae-out" }));
  A.api("GET", `/api/v1/models/${encodeURIComponent(m.name)}/saes`).then((saes) => {
    box.querySelector("#ip-sae-name").replaceChildren(...saes.map((x) => h("option", { value: x.name,
      text: `${x.name} · ${x.kind} · ${t("ip.sae_stream", { stream: x.stream })} · ${x.n_features}` })));
    box.querySelector("#ip-sae-none").textContent = saes.length ? "" : t("ip.sae_none");
    form.hidden = !saes.length || !S.books.length;
    if (saes.length && !S.books.length) box.querySelector("#ip-sae-none").textContent = t("train.no_books");
  }).catch((e) => { box.querySelector("#ip-sae-none").textContent = "✗ " + e.message; });
  return box;
}

async function browse(A, m, form) {
  const f = (id) => form.querySelector("#ip-sae-" + id), msg = f("msg"), out = document.querySelector("#ip-sae-out");
  const body = { book: f("book").value };
  const wanted = f("features").value.split(",").map((x) => x.trim()).filter(Boolean);
  if (wanted.length) {
    if (wanted.some((x) => !/^\d+$/.test(x))) { msg.textContent = "✗ " + A.t("ip.sae_features_bad"); msg.className = "msg bad"; return; }
    body.features = wanted.map(Number);
  }
  msg.textContent = A.t("ip.working");
  msg.className = "msg";
  try {
    const r = await A.api("POST", `/api/v1/models/${encodeURIComponent(m.name)}/saes/${encodeURIComponent(f("name").value)}/browse`, body);
    msg.textContent = A.t("ip.sae_summary", { alive: r.alive, n: r.n_features, tokens: r.tokens });
    out.replaceChildren(...r.features.map((c) => card(A, c)));
  } catch (e) {
    msg.textContent = "✗ " + e.message;
    msg.className = "msg bad";
  }
}

// one feature: where it fires most (the token marked), the tokens it fires on, what it promotes and suppresses
function card(A, c) {
  const { t, h } = A, list = (key, items) => h("p", {}, h("b", { text: t(key) + " " }), items.join(" · "));
  return h("article", { class: "ip-card", "data-feature": c.feature },
    h("h5", { text: t("ip.sae_feature", { id: c.feature, pct: pct(c.frequency), max: c.max_activation.toFixed(2) }) }),
    h("ol", { class: "ip-contexts" }, ...c.contexts.map((x) => h("li", { title: x.activation.toFixed(3) },
      ...x.tokens.map((tok, i) => (i === x.at ? h("mark", { text: tok }) : tok))))),
    list("ip.sae_fires", c.tokens.map((x) => `${x.token} (${x.count})`)),
    list("ip.sae_promotes", c.promotes.map((x) => x.token)),
    list("ip.sae_suppresses", c.suppresses.map((x) => x.token)));
}

function sync(form) {
  const view = form.querySelector("#ip-view").value;
  for (const e of form.querySelectorAll(".ip-patch")) e.hidden = view !== "patch";
  form.querySelector("#ip-target").disabled = view === "attention";
}

async function look(A, m, form) {
  const f = (id) => form.querySelector("#ip-" + id), view = f("view").value, msg = f("msg");
  const body = { view, prompt: f("prompt").value, bos: f("bos").checked };
  if (view === "patch") body.corrupt = f("corrupt").value;
  if (view !== "attention" && f("target").value) body.target = f("target").value;
  msg.textContent = A.t("ip.working");
  msg.className = "msg";
  try {
    I.result = await A.api("POST", `/api/v1/models/${encodeURIComponent(m.name)}/interp`, body);
    I.head = [0, 0];
    msg.textContent = "";
    show(A, I.result);
  } catch (e) {
    msg.textContent = "✗ " + e.message;
    msg.className = "msg bad";
  }
}

// a cell's background: blue for a share in [0, 1] (lens, attention), blue/red for a signed one (patching)
const shade = (v) => (v >= 0 ? `rgba(37, 99, 235, ${Math.min(v, 1).toFixed(3)})` : `rgba(220, 38, 38, ${Math.min(-v, 1).toFixed(3)})`);
const ink = (v) => (Math.abs(v) > 0.55 ? "#fff" : "#111");
const pct = (v) => (Math.round(v * 1000) / 10).toString() + "%";

function grid(A, id, caption, cols, rows) {
  const { h } = A;
  return h("div", { class: "ip-scroll", tabindex: "0", role: "region", "aria-label": caption },
    h("table", { id, class: "ip-grid" }, h("caption", { text: caption }),
      h("thead", {}, h("tr", {}, h("th"), ...cols.map((c, i) => h("th", { scope: "col", text: c, title: `${i}: ${c}` })))),
      h("tbody", {}, ...rows.map(([name, cells]) => h("tr", {}, h("th", { scope: "row", text: name }),
        ...cells.map(([text, value, title]) => cell(h("td", { text, title, "data-v": value }), value)))))));
}

// the colours through the style object: the page's Content-Security-Policy refuses style attributes
function cell(td, value) {
  td.style.background = shade(value);
  td.style.color = ink(value);
  return td;
}

function show(A, r) {
  const { t, h } = A, out = document.querySelector("#ip-out");
  if (!out) return;
  let parts;
  if (r.view === "lens") {
    const rows = r.streams.map((s, i) => [s, r.top[i].map((top, p) => [top[0].token, r.target.prob[i][p],
      `${s} @ ${r.tokens[p]}: ${top.map((x) => `${x.token} ${pct(x.prob)}`).join(", ")} · p(${r.target.text}) ${pct(r.target.prob[i][p])}`])]);
    parts = [grid(A, "ip-lens", t("ip.lens_caption", { target: r.target.text }), r.tokens, rows.reverse())];
  } else if (r.view === "attention") {
    const L = r.attention.length, H = r.attention[0].length, [l, hd] = I.head;
    const pick = (id, n, value, key) => h("label", {}, h("span", { text: t(key) }), h("select", { id, onchange: (e) => {
      I.head[id === "ip-layer" ? 0 : 1] = +e.target.value; show(A, r); } }, ...Array.from({ length: n }, (_, i) => h("option", { value: i, text: i, selected: i === value }))));
    const rows = r.tokens.map((q, i) => [q, r.attention[l][hd][i].map((w, k) => [k <= i ? (w >= 0.005 ? Math.round(w * 100).toString() : "") : "", w,
      `${q} → ${r.tokens[k]}: ${pct(w)}`])]);
    parts = [h("div", { class: "form-grid ip-heads" }, pick("ip-layer", L, l, "ip.layer"), pick("ip-head", H, hd, "ip.head")),
      grid(A, "ip-attention", t("ip.attention_caption", { layer: l, head: hd }), r.tokens, rows)];
  } else {
    const rows = r.streams.map((s, i) => [s, r.restored[i].map((v, p) => [v.toFixed(2), v, `${s} @ ${r.tokens[p]}: ${v.toFixed(4)}`])]);
    parts = [h("p", { id: "ip-patch-summary", text: t("ip.patch_summary", { target: r.target.text, foil: r.foil.text,
      clean: r.logit_diff_clean.toFixed(3), corrupt: r.logit_diff_corrupt.toFixed(3) }) }),
      grid(A, "ip-patch", t("ip.patch_caption"), r.tokens, rows.reverse())];
  }
  out.replaceChildren(...parts);
}
