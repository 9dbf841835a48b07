// Shared by the chat page and the dashboard: the API key (sessionStorage), authenticated
// fetches, the key dialog, and a tiny DOM builder that only ever sets text, never HTML.

const KEY_STORAGE = "nanovllm.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** The server answered 401: the key is missing or wrong. */
export class AuthError extends Error {}

/** Message of an OpenAI-shaped error body, or the HTTP status line. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

/** fetch() with the stored key; throws AuthError on 401 and Error on any other non-2xx status. */
export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = getKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new AuthError(await errorMessage(response));
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

/**
 * Run `work` (an async function using api()); when the server refuses the key, ask for one
 * and try again. Resolves to work's result, or null when the user cancels the dialog.
 */
export async function withKey(work) {
  for (;;) {
    try {
      return await work();
    } catch (e) {
      if (!(e instanceof AuthError)) throw e;
      const key = await askForKey(getKey() ? "The server refused this API key." : "This server needs an API key.");
      if (key === null) return null;
    }
  }
}

let pendingAsk = null;

/** Show the key dialog (one at a time); resolves to the new key, or null when cancelled. */
export function askForKey(message) {
  if (pendingAsk) return pendingAsk;
  const dialog = document.getElementById("key-dialog");
  const input = dialog.querySelector("input");
  dialog.querySelector(".key-message").textContent = message;
  input.value = "";
  pendingAsk = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      pendingAsk = null;
      const key = dialog.returnValue === "save" ? input.value.trim() : "";
      if (key) setKey(key);
      resolve(key || null);
    }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return pendingAsk;
}

/** Wire the page's "key" button: change or forget the stored key. */
export function bindKeyButton(button, onChange) {
  button.addEventListener("click", async () => {
    const key = await askForKey(getKey() ? "Replace the stored API key (kept for this tab only)." :
      "Enter the server's API key (kept for this tab only).");
    if (key !== null && onChange) onChange();
  });
}

/** el("div", {class: "x", title: "y"}, child, "text", ...): an element with attributes and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

/** 1234.5 -> "1,235"; small values keep `digits` decimals. */
export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (Math.abs(value) >= 100) return Math.round(value).toLocaleString("en-US");
  return value.toFixed(digits);
}

/** Seconds -> "850 ms" / "1.24 s". */
export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds === 0) return "0";
  if (seconds < 1) return `${seconds < 0.01 ? (seconds * 1000).toFixed(1) : Math.round(seconds * 1000)} ms`;
  return `${seconds.toFixed(2)} s`;
}
