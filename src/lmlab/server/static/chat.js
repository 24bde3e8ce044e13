// The Chat tab: a conversation with a model that has lmlab's chat template (chat_template.jinja, written by
// `lmlab tune sft` on conversations; the model card's `chat`), its reply streamed token by token from the
// server's OpenAI-compatible route (POST /v1/chat/completions with stream: true, behind the same token and
// cross-site guards as the rest of the API), with the history, a system prompt, temperature, top-p and max
// tokens. Models without a template are not offered: the tab says which and why. The conversation lives in
// this page only.

let A = null;  // app.js: { S, t, h, apiHeaders, toast }
const C = { cards: [], messages: [], abort: null, sig: null, notes: [] };  // notes: i18n keys, said under the form
const $ = (s) => document.querySelector(s);

export function initChat(app) {
  A = app;
  const { h, t } = A, i = (key, tag, attrs = {}) => h(tag, { "data-i18n": key, text: t(key), ...attrs });
  $("#tab-chat").append(
    i("chat.title", "h2"),
    h("form", { id: "chat-settings", class: "card form-grid", autocomplete: "off", onsubmit: (e) => e.preventDefault() },
      h("label", {}, i("train.model", "span"), h("select", { id: "chat-model", onchange: clear })),
      h("label", {}, i("gen.temperature", "span"), h("input", { type: "number", id: "chat-temperature", min: "0", max: "2", step: "0.05", value: "0.7" })),
      h("label", {}, h("span", { text: "top-p" }), h("input", { type: "number", id: "chat-top_p", min: "0.05", max: "1", step: "0.05", value: "1" })),
      h("label", {}, i("chat.max_tokens", "span"), h("input", { type: "number", id: "chat-max_tokens", min: "1", max: "100000", placeholder: t("chat.max_tokens_auto") })),
      h("label", { class: "wide" }, i("chat.system", "span"), h("textarea", { id: "chat-system", rows: "2", placeholder: t("chat.system_hint") }))),
    h("p", { id: "chat-why", class: "muted" }),
    h("div", { id: "chat-log", class: "card chat-log", role: "log", tabindex: "0", "aria-live": "polite", "aria-label": t("chat.title") }),
    h("form", { id: "chat-form", class: "card chat-form", autocomplete: "off", onsubmit: (e) => { e.preventDefault(); send(); } },
      h("label", { class: "wide" }, i("chat.message", "span"), h("textarea", { id: "chat-input", rows: "3" })),
      h("div", { class: "actions" }, i("chat.send", "button", { type: "submit", id: "chat-send" }),
        i("gen.stop_btn", "button", { type: "button", id: "chat-stop", disabled: true, onclick: () => C.abort && C.abort.abort() }),
        i("chat.clear", "button", { type: "button", id: "chat-clear", class: "secondary", onclick: clear }),
        h("span", { id: "chat-msg", class: "msg", "aria-live": "polite" }))));
  // Enter sends, Shift+Enter starts a new line (as chat clients do)
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
}

// the tab is shown: which models chat (their cards), again, as models are trained and tuned meanwhile
export async function showChat() {
  try { C.cards = await A.api("GET", "/api/v1/cards"); } catch (e) { A.toast(e.message, true); }
  renderChat();
}

export function renderChat() {
  if (!A || !$("#chat-model")) return;
  const { t, h } = A, chatty = C.cards.filter((c) => c.chat), others = C.cards.filter((c) => c.trained && !c.chat);
  const sig = JSON.stringify([chatty.map((c) => c.name), others.map((c) => c.name), t("chat.title")]);
  if (C.sig !== sig) {
    C.sig = sig;
    const sel = $("#chat-model"), keep = sel.value;
    sel.replaceChildren(...chatty.map((c) => h("option", { value: c.name, text: c.name })));
    if (chatty.some((c) => c.name === keep)) sel.value = keep;
    else if (keep && (C.messages.length || C.abort)) clear();  // its model is gone: the next turn must not go to another
    $("#chat-why").textContent = (chatty.length ? "" : t("chat.none") + " ") + t("chat.why") +
      (others.length ? " " + t("chat.without", { names: others.map((c) => c.name).join(", ") }) : "");
  }
  // what initChat wrote in one language, rewritten in the current one
  $("#chat-max_tokens").placeholder = t("chat.max_tokens_auto");
  $("#chat-system").placeholder = t("chat.system_hint");
  $("#chat-log").setAttribute("aria-label", t("chat.title"));
  $("#chat-send").disabled = !chatty.length || C.abort != null;
  if (C.notes.length) $("#chat-msg").textContent = C.notes.map((key) => t(key)).join(" ");
  if (!C.messages.length && !$("#chat-log").children.length) $("#chat-log").append(h("p", { class: "muted", id: "chat-empty", text: t("chat.empty") }));
  else if ($("#chat-empty")) $("#chat-empty").textContent = t("chat.empty");
}

function clear() {
  if (C.abort) C.abort.abort();
  C.messages = [];
  $("#chat-log").replaceChildren();
  $("#chat-msg").textContent = "";
  C.notes = [];
  renderChat();
}

function bubble(role, text) {
  const { h, t } = A, body = h("div", { class: "chat-text", text });
  const el = h("div", { class: "chat-turn " + role, "data-role": role }, h("div", { class: "chat-role", "data-i18n": "chat.role_" + role, text: t("chat.role_" + role) }), body);
  $("#chat-empty")?.remove();
  $("#chat-log").append(el);
  follow();
  return body;
}

const follow = () => { const log = $("#chat-log"); log.scrollTop = log.scrollHeight; };

function settings() {
  const num = (id) => $(id).value === "" ? null : parseFloat($(id).value);
  const body = { temperature: num("#chat-temperature"), top_p: num("#chat-top_p") };
  const max = num("#chat-max_tokens");
  if (max != null) body.max_tokens = Math.round(max);
  return body;
}

// A setting out of its field's range, in words of the page's language (the server's 400 would say it in English)
function badSetting() {
  const { t } = A;
  for (const input of $("#chat-settings").querySelectorAll("input[type=number]")) {
    const field = input.closest("label").querySelector("span").textContent, v = input.value === "" ? null : Number(input.value);
    if (v == null) continue;
    if (input.validity.badInput || !Number.isFinite(v)) return t("err.number", { field, input: input.value });
    if (v < Number(input.min)) return t("err.ge", { field, ge: input.min });
    if (v > Number(input.max)) return t("err.le", { field, le: input.max });
  }
  return null;
}

async function send() {
  const text = $("#chat-input").value, model = $("#chat-model").value, msg = $("#chat-msg");
  if (!text.trim() || !model || C.abort) return;
  const bad = badSetting();
  if (bad) { msg.textContent = "✗ " + bad; msg.className = "msg bad"; return; }
  const system = $("#chat-system").value.trim();
  let drop = 0;  // the oldest messages this turn leaves out: left out of the history only once the turn is whole
  const messages = () => [...(system ? [{ role: "system", content: system }] : []),
    ...C.messages.slice(drop).map(({ role, content }) => ({ role, content })), { role: "user", content: text }];
  const asked = bubble("user", text).parentElement;
  $("#chat-input").value = "";
  const out = bubble("assistant", "");
  out.parentElement.classList.add("streaming");
  msg.textContent = "";
  msg.className = "msg";
  C.notes = [];
  C.abort = new AbortController();
  $("#chat-stop").disabled = false;
  // the focused Send is switched off while the reply streams: the keyboard goes on to Stop, then back to Send
  const fromSend = document.activeElement === $("#chat-send");
  renderChat();
  if (fromSend) $("#chat-stop").focus();
  let reply = "", finish = null;
  try {
    // the oldest rounds that no longer fit in the model's context with room for the reply are left out (drawn dashed),
    // the system prompt kept, as `lmlab chat` does; the server counts the tokens (its template, its tokenizer)
    ({ drop } = await A.api("POST", "/api/v1/chat/fit", { model, messages: messages(), max_tokens: settings().max_tokens }));
    const res = await fetch("/v1/chat/completions", {
      method: "POST", signal: C.abort.signal, headers: { "Content-Type": "application/json", ...A.apiHeaders() },
      body: JSON.stringify({ model, messages: messages(), stream: true, ...settings() }) });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || `${res.status} ${res.statusText}`);
    }
    const reader = res.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).replace(/^data: /, "");
        buf = buf.slice(cut + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; follow(); }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    // the turn joins the history once it is whole: a stopped or failed reply is not sent back to the model, and
    // the rounds it would have pushed out stay
    if (drop) {
      for (const m of C.messages.splice(0, drop)) m.el.classList.add("dropped");
      C.notes.push("chat.trimmed");
    }
    C.messages.push({ role: "user", content: text, el: asked }, { role: "assistant", content: reply, el: out.parentElement });
    if (finish === "length") C.notes.push("chat.cut");
  } catch (e) {
    if (!out.isConnected) return;  // the conversation was cleared meanwhile (Clear, or its model is gone)
    if (e.name === "AbortError") C.notes.push("chat.stopped");
    else {  // fetch's TypeError: no answer at all (the server stopped, the network is down), said in the page's language
      msg.textContent = "✗ " + (e instanceof TypeError ? A.t("chat.offline") : e.message);
      msg.className = "msg bad";
    }
    out.parentElement.classList.add("failed");
    if (!$("#chat-input").value) $("#chat-input").value = text;  // to send again, or to shorten, without retyping
  } finally {
    out.parentElement.classList.remove("streaming");
    C.abort = null;
    const onStop = document.activeElement === $("#chat-stop");
    $("#chat-stop").disabled = true;
    renderChat();
    if (onStop || (fromSend && document.activeElement === document.body)) $("#chat-send").focus();
    if (!msg.classList.contains("bad")) msg.className = "msg";
  }
}
