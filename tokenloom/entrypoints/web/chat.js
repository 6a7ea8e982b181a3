// tokenloom web chat: plain browser JavaScript, no build step. It talks to the OpenAI-compatible API of the server
// that served it (relative URLs, so it also works behind a reverse proxy under a sub-path).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = { chat: "tokenloom.chat", settings: "tokenloom.settings", key: "tokenloom.apiKey" };
const NUMBERS = { temperature: parseFloat, top_p: parseFloat, top_k: parseInt, max_tokens: parseInt, seed: parseInt };
const FIELDS = ["system", ...Object.keys(NUMBERS)];

let history = load(STORE.chat, []); // [{role, content, stats?}], the conversation sent with every request
let controller = null; // the AbortController of the reply in flight, null when idle

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback; // a damaged entry must not keep the page from starting
  }
}

function save(key, value) {
  localStorage.setItem(key, JSON.stringify(value));
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    return body.error?.message ?? body.error ?? text;
  } catch {
    return text || `HTTP ${res.status}`;
  }
}

// ---- conversation view (model output only ever goes through textContent / Text nodes, never innerHTML) --------
function follow(fn) {
  const log = $("log");
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 48; // keep following unless scrolled up
  const out = fn();
  if (atEnd) log.scrollTop = log.scrollHeight;
  return out;
}

function addMessage(msg) {
  return follow(() => {
    const el = document.createElement("article");
    el.className = `msg ${msg.role}`;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = msg.role === "user" ? "You" : "Assistant";
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = msg.content;
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = msg.stats ?? "";
    el.append(who, text, stats);
    $("log").append(el);
    return { el, text, stats };
  });
}

function renderHistory() {
  $("log").replaceChildren();
  history.forEach(addMessage);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

// ---- settings ------------------------------------------------------------------------------------------------
function saveSettings() {
  const s = { model: $("model").value };
  for (const f of FIELDS) s[f] = $(f).value;
  save(STORE.settings, s);
}

function restoreSettings() {
  const s = load(STORE.settings, {});
  for (const f of FIELDS) $(f).value = s[f] ?? "";
  $("api-key").value = load(STORE.key, "");
}

async function loadModels() {
  const select = $("model");
  try {
    const res = await fetch("v1/models", { headers: authHeaders() });
    if (res.status === 401) {
      select.replaceChildren();
      setStatus("This server needs an API key: enter it under Settings.", true);
      $("settings").open = true;
      return;
    }
    if (!res.ok) throw new Error(await errorMessage(res));
    const { data } = await res.json();
    const saved = load(STORE.settings, {}).model;
    select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === saved)) select.value = saved;
    setStatus("");
  } catch (err) {
    setStatus(`Could not list the models: ${err.message}`, true);
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value;
  if (system.trim()) messages.push({ role: "system", content: system });
  for (const m of history) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if ($("model").value) body.model = $("model").value;
  for (const [name, parse] of Object.entries(NUMBERS)) {
    const v = parse($(name).value);
    if (Number.isFinite(v)) body[name] = v; // empty: the server's default
  }
  return body;
}

// ---- streaming -----------------------------------------------------------------------------------------------
// The `data:` payloads of a server-sent-events response, as they arrive.
async function* sseData(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const lines = frame.split("\n").filter((l) => l.startsWith("data:"));
      if (lines.length) yield lines.map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    }
  }
}

function statsLine(r) {
  const parts = r.stopped ? ["stopped"] : [];
  // usage arrives only with a finished stream; a stopped one counts its chunks (about one token each)
  const tokens = r.usage?.completion_tokens ?? r.chunks;
  parts.push(`${r.usage ? "" : "~"}${tokens} tokens`);
  if (tokens > 1 && r.tEnd > r.tFirst) parts.push(`${((tokens - 1) / ((r.tEnd - r.tFirst) / 1000)).toFixed(1)} tok/s`);
  if (r.tFirst) parts.push(`first token after ${Math.round(r.tFirst - r.t0)} ms`);
  if (r.finish === "length") parts.push("max tokens reached");
  return parts.join(" · ");
}

async function send(text) {
  const conv = history; // "New chat" during the reply replaces `history`: the reply belongs to this one
  const user = { role: "user", content: text };
  conv.push(user);
  save(STORE.chat, history);
  const userView = addMessage(user);
  const body = requestBody();
  const reply = { role: "assistant", content: "" };
  const view = addMessage(reply);
  const node = document.createTextNode("");
  view.text.append(node);
  view.el.classList.add("streaming");
  view.el.setAttribute("aria-busy", "true"); // screen readers read the reply once, when it is complete
  controller = new AbortController();
  setBusy(true);
  setStatus("");
  const r = { t0: performance.now(), tFirst: 0, tEnd: 0, chunks: 0, usage: null, finish: null, stopped: false };
  let failed = false;
  try {
    const res = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal, // abort() closes the connection: the server sees it and stops generating
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message ?? String(chunk.error));
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content;
      if (delta) {
        r.tFirst ||= performance.now();
        r.chunks += 1;
        reply.content += delta;
        follow(() => node.appendData(delta)); // appending keeps long replies linear, not quadratic
      }
      if (choice?.finish_reason) r.finish = choice.finish_reason;
      if (chunk.usage) r.usage = chunk.usage;
    }
  } catch (err) {
    if (err.name === "AbortError") r.stopped = true;
    else {
      failed = true;
      setStatus(err.message, true);
    }
  } finally {
    r.tEnd = performance.now();
    controller = null;
    view.el.classList.remove("streaming");
    view.el.removeAttribute("aria-busy");
    if (reply.content) {
      reply.stats = failed ? "error" : statsLine(r);
      view.stats.textContent = reply.stats;
      conv.push(reply);
    } else if (conv.at(-1) === user) {
      // Nothing came: the message goes back to the input box (roles must keep alternating for many templates).
      conv.pop();
      view.el.remove();
      userView.el.remove();
      if (!$("prompt").value) $("prompt").value = text;
    }
    save(STORE.chat, history);
    setBusy(false);
  }
}

// ---- wiring --------------------------------------------------------------------------------------------------
function submit(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  send(text);
}

function start() {
  restoreSettings();
  renderHistory();
  setBusy(false);
  $("composer").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    } else if (e.key === "Escape") {
      controller?.abort();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    controller?.abort();
    history = [];
    save(STORE.chat, history);
    renderHistory();
    $("prompt").focus();
  });
  for (const f of FIELDS) $(f).addEventListener("input", saveSettings);
  $("model").addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => {
    save(STORE.key, $("api-key").value.trim());
    loadModels();
  });
  loadModels();
  $("prompt").focus();
}

start();
