// epx dashboard: a streaming chat through the OpenAI endpoint, and the router heatmap and
// serving state polled from /v1/epx/stats. Plain ES2020, no dependencies. Every server-provided
// string goes into the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "epx-api-key";
const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(50, Number(params.get("poll_ms")) || 1000);

// proto3 JSON writes 64-bit integers as strings: always go through Number().
const num = (v) => Number(v ?? 0);
// The exact integer text of a count (a uint64 string stays as the server wrote it).
const intText = (v) => (typeof v === "string" && /^\d+$/.test(v) ? v : String(Math.trunc(num(v))));
const fmtInt = (v) => num(v).toLocaleString("en-US");

const state = {
  modelId: "",
  stats: null,        // the last stats answer
  prevStats: null,    // the one before, for rates
  conversation: [],   // [{role, content}] sent whole with each request
  streaming: false,
};

// ---------- HTTP with the optional bearer key ----------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function apiFetch(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const res = await fetch(path, { ...options, headers });
  if (res.status === 401) showAuth(true);
  return res;
}

// The message of an OpenAI-style error body, or the status line.
async function errorText(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${res.status} ${res.statusText}`.trim();
}

function showAuth(show) {
  const wasHidden = $("auth").hidden;
  $("auth").hidden = !show;
  if (show && wasHidden) $("api-key").focus();
}

$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  showAuth(false);
  loadModel();
  pollNow();
});

// ---------- header ----------

async function loadModel() {
  try {
    const res = await apiFetch("/v1/models");
    if (!res.ok) return;
    const body = await res.json();
    const model = body.data && body.data[0];
    if (model && model.id) {
      state.modelId = model.id;
      $("model-id").textContent = model.id;
      document.title = "epx · " + model.id;
    }
  } catch (_) { /* retried by the next poll */ }
}

function fmtDuration(seconds) {
  const s = Math.floor(num(seconds));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), r = s % 60;
  const pad = (x) => String(x).padStart(2, "0");
  if (d) return `${d}d ${h}h ${pad(m)}m`;
  if (h) return `${h}h ${pad(m)}m ${pad(r)}s`;
  if (m) return `${m}m ${pad(r)}s`;
  return `${r}s`;
}

function renderHeader(s) {
  const ready = $("ready");
  if (s.draining) {
    ready.dataset.state = "draining";
    ready.textContent = "draining";
  } else if (s.ready) {
    ready.dataset.state = "ready";
    ready.textContent = "ready";
  } else {
    ready.dataset.state = "not-ready";
    ready.textContent = "not ready" + (s.not_ready_reason ? ": " + s.not_ready_reason : "");
  }
  $("uptime").textContent = fmtDuration(s.uptime_s);
  $("steps").textContent = intText(s.steps);
}

// A failed poll: the reason in the header, and the badge says what is known.
function showConnError(text, badge = "unreachable") {
  const el = $("conn-error");
  el.hidden = !text;
  el.textContent = text || "";
  if (text) {
    $("ready").dataset.state = "unknown";
    $("ready").textContent = badge;
  }
}

// ---------- small DOM helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// ---------- heatmap ----------

// White to deep blue (t in [0, 1]); returns the background and a readable text colour.
const BLUES = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
function heatColour(t) {
  const x = Math.min(1, Math.max(0, t)) * (BLUES.length - 1);
  const i = Math.min(BLUES.length - 2, Math.floor(x)), f = x - i;
  const c = BLUES[i].map((a, k) => Math.round(a + (BLUES[i + 1][k] - a) * f));
  return { bg: `rgb(${c[0]}, ${c[1]}, ${c[2]})`, fg: t > 0.55 ? "#fff" : "#1a2433" };
}

// The rows the selected mode shows: {rows: [[count...]...], label, empty}.
function heatmapData(s, mode) {
  const layers = s.layers || [];
  if (mode === "total") {
    return { rows: layers.map((l) => l.expert_tokens || []), label: `since start: ${intText(s.steps)} steps` };
  }
  if (mode === "request") {
    const r = s.last_request || {};
    const rl = r.layers || [];
    if (!rl.length) return { rows: [], label: "", empty: true };
    const label = `request ${r.request_id || "?"}: ${fmtInt(r.prompt_tokens)} prompt + ` +
      `${fmtInt(r.completion_tokens)} completion tokens`;
    return { rows: rl.map((l) => l.expert_tokens || []), label };
  }
  const n = num(s.window_steps);
  return { rows: layers.map((l) => l.recent_expert_tokens || []), label: `last ${n} steps` };
}

function renderHeatmap() {
  const s = state.stats;
  if (!s) return;
  const mode = $("heatmap-mode").value;
  const windowOption = $("heatmap-mode").querySelector('option[value="window"]');
  setText(windowOption, `last ${num(s.window_steps)} steps`);
  const { rows, label, empty } = heatmapData(s, mode);
  const table = $("heatmap");
  setText($("heatmap-label"), label);
  $("heatmap-empty").hidden = !empty;
  table.hidden = !!empty;
  if (empty) {
    table.replaceChildren();
    delete table.dataset.shape;
    return;
  }

  const experts = rows.reduce((m, r) => Math.max(m, r.length), 0);
  let max = 0;
  for (const r of rows) for (const v of r) max = Math.max(max, num(v));
  const totals = new Array(experts).fill(0);
  for (const r of rows) r.forEach((v, e) => { totals[e] += num(v); });
  const grand = totals.reduce((a, b) => a + b, 0);

  // Rebuild only when the shape changes; otherwise update the cells in place.
  const shape = `${rows.length}x${experts}`;
  if (table.dataset.shape !== shape) buildHeatmap(table, rows.length, experts, shape);
  const body = table.tBodies[0];
  rows.forEach((r, l) => {
    const tr = body.rows[l];
    let rowMax = 0, rowSum = 0;
    for (let e = 0; e < experts; e++) {
      const v = r[e] ?? 0;
      const td = tr.cells[e + 1];
      setText(td, intText(v));
      const { bg, fg } = heatColour(max > 0 ? num(v) / max : 0);
      td.style.backgroundColor = bg;
      td.style.color = fg;
      rowMax = Math.max(rowMax, num(v));
      rowSum += num(v);
    }
    // max / mean: 1.00 is a perfectly balanced layer.
    const imbalance = rowSum > 0 ? (rowMax * experts / rowSum).toFixed(2) + "×" : "–";
    setText(tr.cells[experts + 1], imbalance);
  });
  const foot = table.tFoot.rows[0];
  totals.forEach((t, e) => {
    const td = foot.cells[e + 1];
    setText(td.firstChild, String(t));
    setText(td.lastChild, grand > 0 ? ((100 * t) / grand).toFixed(1) + "%" : "");
  });
}

function buildHeatmap(table, layers, experts, shape) {
  const head = el("tr", {}, el("th", { text: "" }));
  for (let e = 0; e < experts; e++) head.append(el("th", { text: "E" + e, scope: "col" }));
  head.append(el("th", { text: "max/mean", scope: "col", class: "aux", title: "largest expert load over the mean" }));
  const body = el("tbody");
  for (let l = 0; l < layers; l++) {
    const tr = el("tr", {}, el("th", { text: "L" + l, scope: "row" }));
    for (let e = 0; e < experts; e++) {
      tr.append(el("td", { "data-layer": String(l), "data-expert": String(e), text: "0" }));
    }
    tr.append(el("td", { class: "aux" }));
    body.append(tr);
  }
  // Column totals: no data-layer, so they never read as cells of a layer.
  const foot = el("tr", {}, el("th", { text: "Σ", scope: "row", title: "rows per expert, all layers" }));
  for (let e = 0; e < experts; e++) foot.append(el("td", { class: "total" }, el("span"), el("small")));
  foot.append(el("td", { class: "aux" }));
  table.replaceChildren(el("thead", {}, head), body, el("tfoot", {}, foot));
  table.dataset.shape = shape;
}

$("heatmap-mode").addEventListener("change", renderHeatmap);

// ---------- serving ----------

function tile(label, value, cls = "") {
  return el("div", { class: "tile " + cls }, el("span", { class: "tile-value", text: value }),
    el("span", { class: "tile-label", text: label }));
}

function renderServing(s) {
  const tiles = [
    tile("queued", fmtInt(s.queue_length)),
    tile("running", fmtInt(s.running_requests)),
    tile("accepted", fmtInt(s.requests_accepted)),
    tile("finished", fmtInt(s.requests_finished)),
    tile("failed", fmtInt(s.requests_failed), num(s.requests_failed) ? "warn" : ""),
    tile("rejected", fmtInt(s.requests_rejected), num(s.requests_rejected) ? "warn" : ""),
    tile("cancelled", fmtInt(s.requests_cancelled)),
    tile("prompt tokens", fmtInt(s.prompt_tokens)),
    tile("generated tokens", fmtInt(s.generated_tokens)),
    tile("tokens computed", fmtInt(s.tokens_computed)),
  ];
  $("serving").replaceChildren(...tiles);

  const used = num(s.kv_blocks_used), total = num(s.kv_blocks_total);
  const pct = total > 0 ? (100 * used) / total : 0;
  $("kv-bar").style.width = Math.min(100, pct) + "%";
  $("kv-bar").dataset.level = pct > 90 ? "high" : pct > 70 ? "mid" : "low";
  $("kv-text").textContent = `${fmtInt(used)} / ${fmtInt(total)} blocks (${pct.toFixed(1)}%) · ` +
    `${fmtInt(s.kv_block_size)} tokens per block`;

  // Generated tokens per second between the last two polls.
  const p = state.prevStats;
  const dt = p ? num(s.uptime_s) - num(p.uptime_s) : 0;
  const rate = dt > 0 ? (num(s.generated_tokens) - num(p.generated_tokens)) / dt : 0;
  $("throughput").textContent = dt > 0 ? `${rate.toFixed(1)} generated tokens/s` : "";
}

// ---------- per-layer time ----------

const PARTS = [
  ["attention", "attention_us"],
  ["MoE", "moe_us"],
  ["dispatch", "dispatch_us"],
  ["expert", "expert_us"],
  ["combine", "combine_us"],
];

function renderLayerTimes(s) {
  const steps = num(s.steps);
  const layers = s.layers || [];
  const table = $("layer-times");
  $("layer-times-empty").hidden = layers.length > 0;
  // Dispatch, expert and combine exist only with workers: leave their columns out otherwise.
  const multi = layers.some((l) => num(l.dispatch_us) || num(l.expert_us) || num(l.combine_us));
  const parts = multi ? PARTS : PARTS.slice(0, 2);
  const avg = (l, f) => (steps > 0 ? num(l[f]) / steps : NaN);
  const widest = Math.max(1e-9, ...layers.map((l) => avg(l, "attention_us") + avg(l, "moe_us")));

  const head = el("tr", {}, el("th", { text: "layer" }));
  for (const [name] of parts) head.append(el("th", { text: name + " µs" }));
  head.append(el("th", { text: "", class: "bar-col" }));
  const body = el("tbody");
  for (const l of layers) {
    const tr = el("tr", {}, el("th", { text: "L" + num(l.layer), scope: "row" }));
    for (const [, f] of parts) {
      const v = avg(l, f);
      tr.append(el("td", { text: Number.isFinite(v) ? v.toFixed(1) : "–" }));
    }
    // Stacked bar: attention, then MoE (split into its parts with workers).
    const bar = el("div", { class: "stack" });
    if (steps > 0) {
      const a = avg(l, "attention_us"), m = avg(l, "moe_us");
      const segs = [["attention", a]];
      if (multi) {
        const d = avg(l, "dispatch_us"), x = avg(l, "expert_us"), c = avg(l, "combine_us");
        segs.push(["router", Math.max(0, m - d - x - c)], ["dispatch", d], ["expert", x], ["combine", c]);
      } else {
        segs.push(["moe", m]);
      }
      for (const [cls, v] of segs) {
        if (!(v > 0)) continue;
        const seg = el("span", { class: "seg seg-" + cls, title: `${cls} ${v.toFixed(1)} µs` });
        seg.style.width = (100 * v) / widest + "%";
        bar.append(seg);
      }
    }
    tr.append(el("td", { class: "bar-col" }, bar));
    body.append(tr);
  }
  table.replaceChildren(el("thead", {}, head), body);

  const legend = multi ? ["attention", "router", "dispatch", "expert", "combine"] : ["attention", "moe"];
  $("layer-legend").replaceChildren(...legend.map((n) =>
    el("span", { class: "key" }, el("i", { class: "seg seg-" + n }), n === "moe" ? "MoE" : n)));
}

// ---------- workers and events ----------

function renderWorkers(s) {
  const workers = s.workers || [];
  const table = $("workers");
  $("workers-empty").hidden = workers.length > 0;
  table.hidden = workers.length === 0;
  $("epoch").textContent = workers.length ? `data plane epoch ${intText(s.epoch)}` : "";
  const placement = $("placement");
  placement.hidden = !(workers.length && s.placement);
  placement.textContent = s.placement ? "placement: " + s.placement : "";
  if (workers.length) {
    const head = el("tr");
    for (const h of ["rank", "host", "device", "state", "heartbeat", "experts", "rows received"]) {
      head.append(el("th", { text: h }));
    }
    const body = el("tbody");
    for (const w of workers) {
      const st = !w.registered ? ["not registered", "bad"] : !w.alive ? ["lost", "bad"] :
        w.member ? ["member, alive", "ok"] : ["alive, joining", "mid"];
      body.append(el("tr", {},
        el("td", { text: String(num(w.rank)) }),
        el("td", { text: w.host || "–" }),
        el("td", { text: w.device || "–" }),
        el("td", {}, el("span", { class: "pill pill-" + st[1], text: st[0] })),
        el("td", { text: num(w.last_heartbeat_age_s).toFixed(1) + " s" }),
        el("td", { class: "mono", text: (w.experts || []).map(num).join(", ") || "–" }),
        el("td", { text: fmtInt(w.rows_received) })));
    }
    table.replaceChildren(el("thead", {}, head), body);
  } else {
    table.replaceChildren();
  }

  // The last 10 events, newest first.
  const events = (s.events || []).slice(-10).reverse();
  $("events-empty").hidden = events.length > 0;
  $("events").replaceChildren(...events.map((ev) => {
    const t = new Date(num(ev.time_unix_s) * 1000);
    return el("li", {},
      el("time", { text: t.toLocaleTimeString([], { hour12: false }) }),
      el("span", { class: "pill pill-kind", text: ev.kind || "?" }),
      el("span", { class: "ev-rank", text: num(ev.rank) ? "rank " + num(ev.rank) : "cluster" }),
      el("span", { class: "ev-msg", text: ev.message || "" }));
  }));
}

// ---------- polling ----------

// One request at a time: a poll asked for while one is running follows right after it.
let pollTimer = 0, polling = false, pollAgain = false;

async function poll() {
  clearTimeout(pollTimer);
  if (polling) { pollAgain = true; return; }
  polling = true;
  try {
    const res = await apiFetch("/v1/epx/stats", { cache: "no-store" });
    if (res.status === 401) {
      showConnError("stats: " + (await errorText(res)), "API key needed");
      return;
    }
    if (!res.ok) throw new Error("stats: " + (await errorText(res)));
    const s = await res.json();
    state.prevStats = state.stats;
    state.stats = s;
    renderHeader(s);
    renderHeatmap();
    renderServing(s);
    renderLayerTimes(s);
    renderWorkers(s);
    showConnError("");
    if (!state.modelId) loadModel();
    document.body.dataset.statsLoaded = "true";
  } catch (err) {
    showConnError(err instanceof TypeError ? "server unreachable" : String(err.message || err));
  } finally {
    polling = false;
    pollTimer = setTimeout(poll, pollAgain ? 0 : POLL_MS);
    pollAgain = false;
  }
}

function pollNow() { poll(); }

// ---------- chat ----------

function addBubble(role, text) {
  $("chat-empty").hidden = true;
  const body = el("div", { class: "bubble-text", text });
  const bubble = el("div", { class: "bubble " + role }, el("div", { class: "bubble-role", text: role }), body);
  $("messages").append(bubble);
  return bubble;
}

function scrollToEnd() {
  const m = $("messages");
  m.scrollTop = m.scrollHeight;
}

function setStreaming(on) {
  state.streaming = on;
  $("send").disabled = on;
  $("send").textContent = on ? "…" : "Send";
}

function readSampling() {
  const clamp = (v, lo, hi, dflt) => (Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : dflt);
  return {
    temperature: clamp(parseFloat($("temperature").value), 0, 2, 0.7),
    top_p: clamp(parseFloat($("top-p").value), 0, 1, 1),
    max_tokens: Math.round(clamp(parseFloat($("max-tokens").value), 1, 4096, 64)),
  };
}

// Reads server-sent events from a fetch body; calls onEvent with each parsed JSON, stops at [DONE].
async function readSse(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const raw = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = raw.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onEvent(JSON.parse(data));
      }
      if (done) return false;
    }
  } finally {
    reader.cancel().catch(() => {});  // closes the connection if we stopped early
  }
}

async function send() {
  const text = $("prompt").value;
  if (state.streaming || !text.trim()) return;
  $("prompt").value = "";
  setStreaming(true);

  const userBubble = addBubble("user", text);
  state.conversation.push({ role: "user", content: text });
  const prev = $("answer");
  if (prev) prev.removeAttribute("id");
  const bubble = addBubble("assistant", "");
  bubble.id = "answer";
  bubble.classList.add("streaming");
  const out = bubble.querySelector(".bubble-text");
  const info = el("div", { class: "bubble-info" });
  bubble.append(info);
  scrollToEnd();

  const body = {
    model: state.modelId || undefined,
    messages: state.conversation.slice(),
    stream: true,
    stream_options: { include_usage: true },
    ...readSampling(),
  };
  let answer = "", id = "", finish = "", usage = null;
  try {
    const res = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (res.status !== 200) throw new Error(await errorText(res));
    const sawDone = await readSse(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.id) id = chunk.id;
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (delta.content) {
        answer += delta.content;
        out.textContent = answer;
        scrollToEnd();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (!sawDone && !finish) throw new Error("the stream ended before the answer finished");

    state.conversation.push({ role: "assistant", content: answer });
    if (id) bubble.dataset.requestId = id;
    const tokens = usage ? num(usage.completion_tokens) : NaN;
    if (Number.isFinite(tokens)) bubble.dataset.completionTokens = String(tokens);
    info.textContent = `${Number.isFinite(tokens) ? tokens : "?"} tokens, finish: ${finish || "?"}`;
    if (!answer) bubble.classList.add("no-text");  // CSS says so; the text stays empty
  } catch (err) {
    // Leave the failed turn out of the conversation so the roles keep alternating.
    state.conversation.pop();
    userBubble.classList.add("failed");
    bubble.dataset.error = "true";
    bubble.classList.add("error");
    if (answer) out.textContent = answer;
    info.textContent = err instanceof TypeError ? "the server could not be reached" : String(err.message || err);
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    setStreaming(false);
    scrollToEnd();
    $("prompt").focus();
    pollNow();  // the heatmap's "last answer" has changed
  }
}

$("send").addEventListener("click", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("clear").addEventListener("click", () => {
  if (state.streaming) return;
  state.conversation = [];
  $("messages").replaceChildren($("chat-empty"));
  $("chat-empty").hidden = false;
});

// Show each control's value next to it.
for (const [id, digits] of [["temperature", 2], ["top-p", 2]]) {
  const input = $(id);
  const show = () => { $(id + "-value").textContent = Number(input.value).toFixed(digits); };
  input.addEventListener("input", show);
  input.addEventListener("change", show);
  show();
}

loadModel();
poll();
