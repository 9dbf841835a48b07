// The dashboard: scrapes /metrics every second, keeps 15 minutes of samples in the page,
// and shows the present as tiles and the recent past as charts.

import { api, bindKeyButton, formatNumber, formatSeconds, withKey } from "./common.js";
import { LineChart } from "./charts.js";
import { histogram, histogramDelta, parsePrometheus, quantile, total } from "./prom.js";

const POLL_MS = 1000;
const KEEP_S = 930;          // the longest window (15 min) plus the percentile span
const RATE_SPAN_S = 5;       // tokens/s: counter increase over the last 5 s
const QUANTILE_SPAN_S = 60;  // each point of the latency charts: the observations of the minute before it
const WINDOW_STORAGE = "nanovllm.dashboard.window";
const P = "nanovllm:";

const $ = (id) => document.getElementById(id);
let history = [];  // scrapes, oldest first: {t (s), running, waiting, kv, gen, prompt, pcq, pch, finished, preempt, ttft, itl}
let windowS = Number(localStorage.getItem(WINDOW_STORAGE)) || 300;
let polling = false;

const pct = (v) => `${formatNumber(v * 100, v < 0.1 ? 1 : 0)}%`;
const charts = {
  requests: new LineChart($("chart-requests"), $("legend-requests"),
    [{ label: "running", color: "--c1" }, { label: "waiting", color: "--c3" }], { format: (v) => formatNumber(v, 0), minYMax: 4 }),
  tokens: new LineChart($("chart-tokens"), $("legend-tokens"),
    [{ label: "generation", color: "--c1" }, { label: "prompt", color: "--c2" }], { format: (v) => formatNumber(v, 0), minYMax: 10 }),
  kv: new LineChart($("chart-kv"), $("legend-kv"), [{ label: "used", color: "--c1" }],
    { format: (v) => `${formatNumber(v, v < 10 ? 1 : 0)}%`, yMax: 100 }),
  hits: new LineChart($("chart-hits"), $("legend-hits"), [{ label: "hit rate (last minute)", color: "--c2" }],
    { format: (v) => `${Math.round(v)}%`, yMax: 100 }),
  ttft: new LineChart($("chart-ttft"), $("legend-ttft"),
    [{ label: "p50", color: "--c2" }, { label: "p90", color: "--c3" }, { label: "p99", color: "--c4" }], { format: formatSeconds, minYMax: 0.01 }),
  itl: new LineChart($("chart-itl"), $("legend-itl"),
    [{ label: "p50", color: "--c2" }, { label: "p90", color: "--c3" }, { label: "p99", color: "--c4" }], { format: formatSeconds, minYMax: 0.01 }),
};

// ------------------------------------------------------------------ scraping
async function poll() {
  polling = true;
  try {
    const text = await withKey(async () => (await api("/metrics")).text());
    if (text === null) {  // the server wants a key and none was given: wait for the key button
      polling = false;
      setLive(false, "needs an API key");
      return;
    }
    record(parsePrometheus(text));
    setLive(true);
  } catch (e) {
    setLive(false, e.message);
  }
  setTimeout(poll, POLL_MS);
}

function record(samples) {
  const running = samples.get(`${P}num_requests_running`);
  if (running && running[0]) $("live-text").dataset.model = running[0].labels.model_name || "";
  const s = {
    t: Date.now() / 1000,
    running: total(samples, `${P}num_requests_running`),
    waiting: total(samples, `${P}num_requests_waiting`),
    kv: total(samples, `${P}kv_cache_usage_perc`),
    gen: total(samples, `${P}generation_tokens_total`),
    prompt: total(samples, `${P}prompt_tokens_total`),
    pcq: total(samples, `${P}prefix_cache_queries_total`),
    pch: total(samples, `${P}prefix_cache_hits_total`),
    finished: total(samples, `${P}request_success_total`),
    preempt: total(samples, `${P}num_preemptions_total`),
    ttft: histogram(samples, `${P}time_to_first_token_seconds`),
    itl: histogram(samples, `${P}inter_token_latency_seconds`),
  };
  const last = history[history.length - 1];
  if (last && (s.gen < last.gen || s.finished < last.finished)) history = [];  // the server restarted
  history.push(s);
  while (history.length && history[0].t < s.t - KEEP_S) history.shift();
  render();
}

function setLive(ok, why) {
  $("live-dot").className = `dot ${ok ? "ok" : "bad"}`;
  const model = $("live-text").dataset.model;
  $("live-text").textContent = ok ? `live${model ? ` · ${model}` : ""} · ${new Date().toLocaleTimeString()}`
    : `no data: ${why}`;
}

// ------------------------------------------------------------------ derived numbers
/** The newest scrape at or before time t (the oldest one when none is that old). */
function sampleAt(t) {
  let lo = 0;
  let hi = history.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (history[mid].t <= t) lo = mid;
    else hi = mid - 1;
  }
  return history[lo];
}

function rate(now, field, span) {
  const then = sampleAt(now.t - span);
  const dt = now.t - then.t;
  return dt > 0 && now[field] !== null ? (now[field] - then[field]) / dt : null;
}

function hitRate(now, then) {
  const queries = now.pcq - then.pcq;
  return queries > 0 ? (now.pch - then.pch) / queries : null;
}

function percentiles(now, field, span) {
  const delta = histogramDelta(now[field], sampleAt(now.t - span)[field]);  // none in the first scrape
  return [0.5, 0.9, 0.99].map((q) => quantile(q, delta));
}

// ------------------------------------------------------------------ rendering
function setText(id, text) {
  $(id).textContent = text;
}

function render() {
  const now = history[history.length - 1];
  const then = sampleAt(now.t - windowS);
  const label = windowS >= 120 ? `last ${windowS / 60} min` : `last ${windowS} s`;
  setText("m-running", formatNumber(now.running, 0));
  setText("m-waiting-sub", `waiting ${formatNumber(now.waiting, 0)}`);
  setText("m-kv", now.kv === null ? "–" : pct(now.kv));
  setText("m-preempt", `preemptions ${formatNumber(now.preempt, 0)}`);
  const hits = hitRate(now, then);
  const lifetime = now.pcq > 0 ? now.pch / now.pcq : null;
  setText("m-hit", hits === null ? "–" : pct(hits));
  setText("m-hit-sub", `since start ${lifetime === null ? "–" : pct(lifetime)}`);
  setText("m-gen-rate", formatNumber(rate(now, "gen", RATE_SPAN_S)));
  setText("m-prompt-rate", `prompt ${formatNumber(rate(now, "prompt", RATE_SPAN_S))} tok/s`);
  setText("m-gen-total", formatNumber(now.gen, 0));
  $("m-gen-total").dataset.value = String(now.gen);
  setText("m-prompt-total", `prompt ${formatNumber(now.prompt, 0)}`);
  setText("m-finished", formatNumber(now.finished, 0));
  setText("m-finished-sub", `${formatNumber(now.finished - then.finished, 0)} in the ${label}`);
  for (const field of ["ttft", "itl"]) {
    const [p50, p90, p99] = percentiles(now, field, windowS);
    setText(`m-${field}`, formatSeconds(p50));
    setText(`m-${field}-sub`, `p90 ${formatSeconds(p90)} · p99 ${formatSeconds(p99)}`);
  }

  const t0 = now.t - windowS;
  const shown = history.filter((s) => s.t >= t0);
  const series = (f) => shown.map((s) => [s.t, f(s)]);
  charts.requests.draw([series((s) => s.running), series((s) => s.waiting)], t0, now.t);
  charts.tokens.draw([series((s) => rate(s, "gen", RATE_SPAN_S)), series((s) => rate(s, "prompt", RATE_SPAN_S))], t0, now.t);
  charts.kv.draw([series((s) => (s.kv === null ? null : s.kv * 100))], t0, now.t);
  charts.hits.draw([series((s) => {
    const h = hitRate(s, sampleAt(s.t - QUANTILE_SPAN_S));
    return h === null ? null : h * 100;
  })], t0, now.t);
  for (const field of ["ttft", "itl"]) {
    const q = shown.map((s) => [s.t, percentiles(s, field, QUANTILE_SPAN_S)]);
    charts[field].draw([0, 1, 2].map((k) => q.map(([t, v]) => [t, v[k]])), t0, now.t);
  }
}

function pickWindow(seconds) {
  windowS = seconds;
  localStorage.setItem(WINDOW_STORAGE, String(seconds));
  for (const b of document.querySelectorAll(".window-picker button")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.window) === seconds));
  }
  if (history.length) render();
}

for (const b of document.querySelectorAll(".window-picker button")) {
  b.addEventListener("click", () => pickWindow(Number(b.dataset.window)));
}
window.addEventListener("resize", () => history.length && render());
bindKeyButton($("key-button"), () => { if (!polling) poll(); });
pickWindow(windowS);
poll();
