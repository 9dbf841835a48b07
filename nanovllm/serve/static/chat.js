// The chat page: streams answers from /v1/chat/completions (SSE over fetch), keeps the
// conversation in sessionStorage, shows tokens/s and time to first token per answer.

import { api, bindKeyButton, el, formatNumber, formatSeconds, withKey } from "./common.js";
import { renderMarkdown } from "./markdown.js";

const SETTINGS_STORAGE = "nanovllm.chat.settings";  // localStorage: nothing secret in it
const CHAT_STORAGE = "nanovllm.chat.conversation";   // sessionStorage: this tab only
const WIDE_SCREEN = "(min-width: 960px)";
const NEAR_BOTTOM_PX = 80;

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), status: $("status"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), model: $("model"), settings: $("settings"), toggle: $("toggle-settings"),
  system: $("system"), temperature: $("temperature"), top_p: $("top_p"), max_tokens: $("max_tokens"),
};

function load(storage, key, fallback) {
  try { return JSON.parse(storage.getItem(key)) ?? fallback; } catch (_) { return fallback; }
}

let conversation = load(sessionStorage, CHAT_STORAGE, []);  // [{role, content, state?, stats?, error?}]
let controller = null;  // the AbortController of the answer now streaming

// ------------------------------------------------------------------ settings
function restoreSettings() {
  const s = load(localStorage, SETTINGS_STORAGE, {});
  for (const name of ["system", "temperature", "top_p", "max_tokens"]) if (s[name] !== undefined) ui[name].value = s[name];
  showSettings(s.open ?? window.matchMedia(WIDE_SCREEN).matches);
  showSliderValues();
}

function saveSettings() {
  const s = { open: !ui.settings.hidden, model: ui.model.value };
  for (const name of ["system", "temperature", "top_p", "max_tokens"]) s[name] = ui[name].value;
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(s));
}

function showSettings(open) {
  ui.settings.hidden = !open;
  ui.toggle.setAttribute("aria-expanded", String(open));
}

function showSliderValues() {
  $("temperature-value").textContent = Number(ui.temperature.value).toFixed(2);
  $("top_p-value").textContent = Number(ui.top_p.value).toFixed(2);
}

function requestBody() {
  const messages = [];
  if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value.trim() });
  for (const m of conversation) {
    if (m.role === "assistant" && (m.state === "streaming" || !m.content)) continue;  // failed or in progress
    messages.push({ role: m.role, content: m.content });
  }
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value), top_p: Number(ui.top_p.value),
  };
  if (ui.model.value) body.model = ui.model.value;
  const maxTokens = parseInt(ui.max_tokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// ------------------------------------------------------------------ models
async function loadModels() {
  try {
    const list = await withKey(async () => (await api("/v1/models")).json());
    if (list === null) return showStatus("This server needs an API key: use the “API key” button.");
    const saved = load(localStorage, SETTINGS_STORAGE, {}).model;
    ui.model.replaceChildren(...list.data.map((m) =>
      el("option", { value: m.id, text: m.id, title: m.max_model_len ? `context: ${m.max_model_len} tokens` : null })));
    if (list.data.some((m) => m.id === saved)) ui.model.value = saved;
    showStatus(null);
  } catch (e) {
    showStatus(`Could not list the models: ${e.message}`);
  }
}

function showStatus(text) {
  ui.status.hidden = !text;
  ui.status.textContent = text || "";
}

// ------------------------------------------------------------------ rendering
function statsText(m) {
  const s = m.stats || {};
  const parts = [];
  if (s.tokens) parts.push(`${s.approximate ? "≈" : ""}${s.tokens} tokens`);
  if (s.tokensPerSecond) parts.push(`${formatNumber(s.tokensPerSecond)} tok/s`);
  if (s.ttft !== undefined && s.ttft !== null) parts.push(`TTFT ${formatSeconds(s.ttft)}`);
  if (m.state === "stopped") parts.push("stopped");
  if (s.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function messageView(m) {
  const body = el("div", { class: "body" });
  const meta = el("div", { class: "meta" });
  const node = el("article", { class: `message ${m.role}` }, el("div", { class: "role", text: m.role }), body, meta);
  const view = { node, body, meta, pending: false };
  view.update = () => {
    node.dataset.state = m.state || "done";
    if (m.role === "assistant") renderMarkdown(m.content, body);
    else body.textContent = m.content;
    if (m.error) body.append(el("p", { class: "error", text: m.error }));
    if (m.state === "streaming" && !m.content) body.append(el("span", { class: "typing", "aria-label": "waiting" }));
    meta.textContent = m.role === "assistant" ? statsText(m) : "";
  };
  view.schedule = () => {  // at most one render per frame while tokens stream in
    if (view.pending) return;
    view.pending = true;
    requestAnimationFrame(() => { view.pending = false; followBottom(view.update); });
  };
  view.update();
  return view;
}

function followBottom(change) {
  const page = document.scrollingElement;
  const atBottom = page.scrollHeight - page.scrollTop - page.clientHeight < NEAR_BOTTOM_PX;
  change();
  if (atBottom) page.scrollTop = page.scrollHeight;
}

function renderConversation() {
  ui.messages.replaceChildren(ui.empty, ...conversation.map((m) => messageView(m).node));
  ui.empty.hidden = conversation.length > 0;
}

function saveConversation() {
  sessionStorage.setItem(CHAT_STORAGE, JSON.stringify(conversation));
}

// ------------------------------------------------------------------ streaming
/** POST the chat and read its SSE stream into `answer`; progress keeps the timings. */
async function stream(body, answer, view, progress, signal) {
  progress.start = performance.now();
  const response = await api("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.usage) progress.usageTokens = event.usage.completion_tokens;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        const now = performance.now();
        progress.first ??= now;
        progress.last = now;
        progress.chunks += 1;
        answer.content += choice.delta.content;
        answer.stats = statsOf(progress);
        view.schedule();
      }
      if (choice.finish_reason) progress.finish = choice.finish_reason;
    }
  }
}

function statsOf(p) {
  const tokens = p.usageTokens ?? p.chunks;  // one chunk per engine step: a token, give or take held-back text
  const decodeSeconds = p.first !== undefined ? (p.last - p.first) / 1000 : 0;
  return {
    tokens, approximate: p.usageTokens === undefined, finish: p.finish,
    ttft: p.first !== undefined ? (p.first - p.start) / 1000 : null,
    tokensPerSecond: tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null,
  };
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "", state: "streaming" };
  const body = requestBody();
  conversation.push(answer);
  ui.empty.hidden = true;
  ui.messages.append(messageView(conversation[conversation.length - 2]).node);
  const view = messageView(answer);
  ui.messages.append(view.node);
  document.scrollingElement.scrollTop = document.scrollingElement.scrollHeight;
  setBusy(true);
  controller = new AbortController();
  const progress = { chunks: 0 };
  try {
    const done = await withKey(() => stream(body, answer, view, progress, controller.signal));
    answer.state = done === null ? "error" : "done";
    if (done === null) answer.error = "Not sent: this server needs an API key.";
  } catch (e) {
    if (e.name === "AbortError") answer.state = "stopped";
    else Object.assign(answer, { state: "error", error: e.message });
  } finally {
    controller = null;
    if (progress.chunks) answer.stats = statsOf(progress);
    followBottom(view.update);
    setBusy(false);
    saveConversation();
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (!busy) ui.prompt.focus();
}

// ------------------------------------------------------------------ events
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  growPrompt();
  send(text);
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});
function growPrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}
ui.prompt.addEventListener("input", growPrompt);
ui.stop.addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  saveConversation();
  renderConversation();
});
ui.toggle.addEventListener("click", () => { showSettings(ui.settings.hidden); saveSettings(); });
for (const name of ["system", "temperature", "top_p", "max_tokens", "model"]) {
  ui[name].addEventListener("input", () => { showSliderValues(); saveSettings(); });
}
bindKeyButton($("key-button"), loadModels);

for (const m of conversation) if (m.state === "streaming") m.state = "stopped";  // a reload cut it short
restoreSettings();
renderConversation();
loadModels();
