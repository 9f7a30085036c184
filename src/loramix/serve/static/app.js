// loramix web page: plain JavaScript, no dependencies. Every value from the server is put into the page
// with textContent (never innerHTML), so adapter names and answers cannot inject markup.
"use strict";

const KEY_STORE = "loramix.apiKey";
const $ = (id) => document.getElementById(id);

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The error message of a non-200 answer, in OpenAI's shape or LoRAX's.
async function errorText(resp) {
  let msg = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    const e = body && body.error;
    if (typeof e === "string") msg = resp.status + ": " + e;
    else if (e && e.message) msg = resp.status + ": " + e.message;
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) msg += " (enter an API key above)";
  return msg;
}

async function getJSON(url) {
  const resp = await fetch(url, { headers: headers(false) });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

async function postJSON(url, body) {
  const resp = await fetch(url, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

function showError(id, err) {
  const p = $(id);
  if (err) { p.textContent = String(err.message || err); p.hidden = false; } else { p.textContent = ""; p.hidden = true; }
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(x, digits) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(digits); }

// --- API key -------------------------------------------------------------------------------------
function initKey() {
  $("key").value = apiKey();
  $("key-status").textContent = apiKey() ? "key saved" : "";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("key").value.trim();
    if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE);
    $("key-status").textContent = k ? "key saved" : "no key";
    refreshAll();
  });
}

// --- library -------------------------------------------------------------------------------------
async function loadLibrary() {
  const q = $("lib-search").value.trim();
  const tags = $("lib-tags").value.trim();
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (tags) params.set("tags", tags);
  const tbody = $("lib-table").querySelector("tbody");
  try {
    const res = await getJSON("/v1/adapters" + (params.toString() ? "?" + params : ""));
    tbody.replaceChildren();
    for (const a of res.data) {
      const tr = el("tr");
      tr.dataset.name = a.name;
      tr.append(el("td", a.name));
      const tagCell = el("td");
      for (const t of [...(a.domain_tags || []), ...(a.skill_tags || [])]) tagCell.append(el("span", t, "tag"));
      tr.append(tagCell, el("td", a.description || ""), el("td", a.use_count ?? 0));
      const owner = a.owner ? a.owner + (a.public ? " (public)" : " (private)") : "shared";
      tr.append(el("td", owner, "dim"));
      tbody.append(tr);
    }
    $("lib-count").textContent = res.data.length + " adapter" + (res.data.length === 1 ? "" : "s");
    showError("lib-error", null);
    if (!q && !tags) fillModels(res.data);
  } catch (err) {
    tbody.replaceChildren();
    $("lib-count").textContent = "";
    showError("lib-error", err);
  }
}

function fillModels(adapters) {
  const sel = $("chat-model");
  const keep = sel.value;
  sel.replaceChildren(new Option("auto (routed)", "auto"), new Option("base model (no adapter)", ""));
  for (const a of adapters) sel.append(new Option(a.name, a.name));
  sel.value = [...sel.options].some((o) => o.value === keep) ? keep : "auto";
}

// --- route playground ----------------------------------------------------------------------------
async function route(ev) {
  ev.preventDefault();
  const query = $("route-query").value.trim();
  const tbody = $("route-table").querySelector("tbody");
  if (!query) { showError("route-error", "type a query first"); return; }
  const body = { query: query, k: Number($("route-k").value) || 3 };
  if ($("route-strategy").value) body.strategy = $("route-strategy").value;
  try {
    const res = await postJSON("/v1/route", body);
    tbody.replaceChildren();
    for (const a of res.adapters) {
      const tr = el("tr");
      const w = el("td", null, "bar");
      const bar = el("span");
      bar.style.width = Math.round(a.weight * 100) + "%";
      w.append(bar, el("b", fmt(a.weight, 3)));
      tr.append(el("td", a.name), el("td", fmt(a.score, 3)), w);
      tbody.append(tr);
    }
    $("route-latency").textContent = fmt(res.latency_ms, 1) + " ms, " + (res.strategy || "");
    showError("route-error", null);
  } catch (err) {
    tbody.replaceChildren();
    showError("route-error", err);
  }
}

// --- chat (streamed) -----------------------------------------------------------------------------
let chatAbort = null;

function showRoute(adapters, routed) {
  const line = $("chat-route");
  if (!adapters || adapters.length === 0) { line.textContent = "route: base model (no adapter)"; return; }
  line.textContent = (routed ? "routed to: " : "adapters: ") +
    adapters.map((a) => a.name + " " + fmt(a.weight, 2)).join(", ");
}

async function chat(ev) {
  ev.preventDefault();
  const prompt = $("chat-input").value.trim();
  if (!prompt) { showError("chat-error", "type a message first"); return; }
  const out = $("chat-output");
  out.textContent = "";
  $("chat-route").textContent = "";
  showError("chat-error", null);
  const body = {
    model: $("chat-model").value, stream: true, messages: [{ role: "user", content: prompt }],
    max_tokens: Number($("chat-max").value) || 64, temperature: Number($("chat-temp").value) || 0,
    stream_options: { include_usage: true },
  };
  if ($("chat-ignore-eos").checked) body.ignore_eos = true;
  chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  $("chat-status").textContent = "streaming...";
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: chatAbort.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", usage = null, shownRoute = false, done = false;
    while (!done) {
      const part = await reader.read();
      if (part.done) break;
      buf += decoder.decode(part.value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {  // one SSE event per blank-line-terminated block
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message || String(obj.error));
          if (!shownRoute && obj.loramix) { showRoute(obj.loramix.adapters, obj.loramix.routed); shownRoute = true; }
          if (obj.usage) usage = obj.usage;
          const choice = obj.choices && obj.choices[0];
          if (choice && choice.delta && choice.delta.content) out.textContent += choice.delta.content;
        }
      }
    }
    const secs = (performance.now() - t0) / 1000;
    $("chat-status").textContent = usage
      ? usage.completion_tokens + " tokens in " + secs.toFixed(2) + " s" : "done in " + secs.toFixed(2) + " s";
    loadMetrics();
  } catch (err) {
    $("chat-status").textContent = "";
    if (err.name !== "AbortError") showError("chat-error", err); else $("chat-status").textContent = "stopped";
  } finally {
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    chatAbort = null;
  }
}

// --- metrics summary -----------------------------------------------------------------------------
let lastTokens = null;

async function loadMetrics() {
  try {
    const m = await getJSON("/metrics/summary");
    const now = performance.now();
    $("m-requests").textContent = m.requests;
    $("m-errors").textContent = m.errors;
    $("m-generations").textContent = m.generations;
    $("m-generated").textContent = m.generated_tokens;
    if (lastTokens) {
      const dt = (now - lastTokens.t) / 1000;
      $("m-toks").textContent = dt > 0 ? fmt((m.generated_tokens - lastTokens.n) / dt, 1) : "-";
    }
    lastTokens = { t: now, n: m.generated_tokens };
    $("m-ttft").textContent = m.ttft_mean_ms === null ? "-" : fmt(m.ttft_mean_ms, 1) + " ms";
    $("m-tpot").textContent = m.tpot_mean_ms === null ? "-" : fmt(m.tpot_mean_ms, 1) + " ms";
    $("m-queue").textContent = m.queue_len ?? "-";
    $("m-running").textContent = m.running ?? "-";
    $("m-loaded").textContent = (m.adapters_loaded ?? "-") + " / " + (m.max_lora ?? "-");
    $("m-updated").textContent = "updated " + new Date().toLocaleTimeString();
    showError("metrics-error", null);
  } catch (err) {
    showError("metrics-error", err);
  }
}

async function loadInfo() {
  try {
    const info = await getJSON("/info");
    $("model-info").textContent = "base model: " + info.model_id;
  } catch (_) { /* the page works without it */ }
}

function refreshAll() { loadLibrary(); loadMetrics(); }

document.addEventListener("DOMContentLoaded", () => {
  initKey();
  $("lib-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadLibrary(); });
  $("route-form").addEventListener("submit", route);
  $("chat-form").addEventListener("submit", chat);
  $("chat-stop").addEventListener("click", () => { if (chatAbort) chatAbort.abort(); });
  loadInfo();
  refreshAll();
  setInterval(loadMetrics, 2000);
});
