// The console: polls the worker's (and on the local endpoint, the queue's) JSON every second
// and draws it. Every value from the server is set with textContent, never as HTML.
"use strict";

const MODE = document.body.dataset.mode; // "local" or "worker"
const LOCAL = MODE === "local";
const KEY_STORE = "runpod-console-key";
const POLL_MS = 1000;
const CHART_MS = 5 * 60 * 1000;
const SVG = "http://www.w3.org/2000/svg";
const FINAL = ["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"];

const routes = LOCAL
  ? { health: "/console/api/health", history: "/console/api/history", jobs: "/console/api/jobs",
      queue: "/console/api/queue", samples: "/console/api/samples" }
  : { health: "/health", history: "/console/api/history", jobs: "/console/api/jobs" };

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else node[k] = v;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const gb = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2) + " GiB");
function ms(x) {
  if (x === null || x === undefined) return "–";
  return x < 1000 ? x + " ms" : (x / 1000).toFixed(1) + " s";
}

let history = [];
let lastSample = 0;
let selectedJob = null;
let samples = {};
let handlerNames = [];
let pollTimer = null;

/** The next refresh: one timer at most, however many refreshes were started. */
function schedule() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(refresh, POLL_MS);
}

function key() { return sessionStorage.getItem(KEY_STORE) || ""; }

/** GET a JSON route; on the local endpoint with the key in the Authorization header. */
async function getJson(url) {
  const headers = LOCAL ? { Authorization: "Bearer " + key() } : {};
  const response = await fetch(url, { headers, cache: "no-store" });
  if (response.status === 401) throw new NeedKey();
  const body = await response.json().catch(() => null);
  return { status: response.status, body };
}

class NeedKey extends Error {}

function askForKey(message) {
  $("key-form").classList.remove("hidden");
  $("main").classList.add("hidden");
  $("key-error").textContent = message || "";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
  $("key-input").value = "";
  $("key-form").classList.add("hidden");
  $("main").classList.remove("hidden");
  samplesLoaded = false;
  clearTimeout(pollTimer);
  refresh();
});

// ---- GPUs ----------------------------------------------------------------------------------

function gpuParts(g) {
  const budget = Math.max(g.budget_gb || 0, 0.0001);
  const used = (g.resident_gb || 0) + (g.reserved_gb || 0) + (g.others_used_gb || 0);
  return { budget, free: Math.max(budget - used, 0) };
}

function drawGpus(gpus) {
  const box = $("gpus");
  $("no-gpu").classList.toggle("hidden", gpus.length > 0);
  box.replaceChildren(...gpus.map((g, i) => {
    const { budget, free } = gpuParts(g);
    const pct = (x) => (100 * Math.min(x || 0, budget)) / budget + "%";
    const seg = (cls, v) => el("div", { class: "seg " + cls, title: cls + " " + gb(v), "data-part": cls });
    const bar = el("div", { class: "bar" });
    for (const [cls, v] of [["resident", g.resident_gb], ["reserved", g.reserved_gb], ["others", g.others_used_gb], ["free", free]]) {
      const s = seg(cls, v);
      s.style.width = pct(v);
      bar.append(s);
    }
    const num = (label, field, v) => el("span", {}, label + " ", el("b", { "data-field": field, "data-value": v }, gb(v)));
    return el("div", { class: "gpu", id: "gpu-" + i },
      el("div", { class: "title" }, el("span", {}, el("b", {}, "GPU " + g.index + " "), g.name || ""),
        el("span", { class: "muted" }, (g.reservations || 0) + " reservation(s)")),
      bar,
      el("div", { class: "numbers" },
        num("budget", "budget_gb", g.budget_gb), num("resident", "resident_gb", g.resident_gb),
        num("reserved", "reserved_gb", g.reserved_gb), num("others", "others_used_gb", g.others_used_gb),
        num("free", "free_gb", Math.round(free * 100) / 100), num("total", "total_gb", g.total_gb)),
      chart(i, g.budget_gb || 0),
      el("div", { class: "muted small" }, chartSpan(i)));
  }));
}

/** What the chart of device `i` covers: "the last 42 s". */
function chartSpan(i) {
  const now = Date.now();
  const first = history.find((s) => s.gpus[i] && now - s.t <= CHART_MS);
  if (!first) return "the chart fills as the worker samples its memory (once a second)";
  const s = Math.round((now - first.t) / 1000);
  return "memory over the last " + (s < 120 ? s + " s" : Math.round(s / 60) + " min") + " (up to 5 min)";
}

/** A stacked area chart of device `i` over the kept history. */
function chart(i, budget) {
  const w = 600, h = 90;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const now = Date.now();
  const points = history.filter((s) => s.gpus[i] && now - s.t <= CHART_MS);
  if (points.length < 2 || budget <= 0) return svg;
  // The window grows to CHART_MS as history gathers, so a fresh worker's chart is not empty.
  const start = points[0].t;
  const span = Math.max(points[points.length - 1].t - start, 1);
  const x = (t) => (w * (t - start)) / span;
  const y = (v) => h - (h * Math.min(v, budget)) / budget;
  const layers = [
    ["resident", (p) => p.resident],
    ["reserved", (p) => p.resident + p.reserved],
    ["others", (p) => p.resident + p.reserved + p.others],
  ];
  let lower = points.map(() => 0);
  for (const [cls, top] of layers) {
    const upper = points.map((s) => top(s.gpus[i]));
    let d = points.map((s, k) => `${k ? "L" : "M"}${x(s.t).toFixed(1)},${y(upper[k]).toFixed(1)}`).join("");
    for (let k = points.length - 1; k >= 0; k--) d += `L${x(points[k].t).toFixed(1)},${y(lower[k]).toFixed(1)}`;
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d + "Z");
    path.setAttribute("fill", getComputedStyle(document.documentElement).getPropertyValue("--" + cls));
    path.setAttribute("opacity", "0.85");
    svg.append(path);
    lower = upper;
  }
  return svg;
}

// ---- handlers and counters -----------------------------------------------------------------

function drawHandlers(handlers) {
  handlerNames = Object.keys(handlers);
  $("handlers").replaceChildren(...Object.entries(handlers).map(([name, h]) => {
    const f = h.footprint;
    const limit = h.limit === h.max_limit ? `${h.limit}` : `${h.limit} (adaptive, of ${h.max_limit})`;
    const meter = el("span", { class: "meter" }, el("i"));
    meter.firstChild.style.width = (100 * h.active) / Math.max(h.max_limit || h.limit || 1, 1) + "%";
    return el("tr", { "data-handler": name },
      el("td", {}, el("b", {}, name), h.available ? "" : " (unavailable)"),
      el("td", {}, h.device),
      el("td", { "data-field": "active-limit", "data-active": h.active, "data-limit": h.limit, "data-max-limit": h.max_limit },
        `${h.active} / ${limit}`, meter),
      el("td", { "data-field": "queued", "data-value": h.queued }, h.queued),
      el("td", { title: f ? f.samples + " samples" : "" }, f ? `${f.learned_gb.toFixed(2)} / ${gb(f.declared_gb)} (${f.samples})` : "–"),
      el("td", {}, f ? gb(f.admitted_gb) : "–"),
      el("td", { "data-field": "typical" }, ms(h.typical_duration_ms)));
  }));
}

// One row per batcher (model and device): what its forward passes hold and what it learned.
function drawBatching(batchers) {
  $("batching").replaceChildren(...batchers.map((b) =>
    el("tr", { "data-batcher": `${b.model} ${b.device}` },
      el("td", { title: (b.handlers || []).join(", ") }, el("b", {}, b.model)),
      el("td", {}, b.device),
      el("td", { "data-field": "batches", "data-value": b.batches }, b.batches),
      el("td", { "data-field": "mean-rows" }, `${b.mean_rows.toFixed(1)} (of ${b.max_batch_rows})`),
      el("td", {}, `${(100 * b.padding_waste).toFixed(0)}%`),
      el("td", {}, b.token_limit === b.max_batch_tokens ? `${b.token_limit}` : `${b.token_limit} (of ${b.max_batch_tokens})`),
      el("td", {}, b.learned_bytes_per_token ? `${(b.learned_bytes_per_token / 1024).toFixed(1)} KiB` : "declared"),
      el("td", {}, `${b.oom_splits} (+${b.error_splits} errors)`),
      el("td", {}, b.pending_rows))));
}

function counters(box, entries) {
  box.replaceChildren(...entries.map(([label, id, value]) =>
    el("div", { class: "counter" }, el("b", { id, "data-value": value }, value ?? "–"), el("span", {}, label))));
}

function drawWorkerJobs(jobs) {
  counters($("worker-jobs"), [
    ["in worker", "w-in-worker", `${jobs.in_worker} / ${jobs.limit}`],
    ["taken", "w-taken", jobs.taken], ["completed", "w-completed", jobs.completed],
    ["failed", "w-failed", jobs.failed], ["cancelled", "w-cancelled", jobs.cancelled],
    ["undelivered", "w-undelivered", jobs.undelivered],
  ]);
}

function drawQueue(q) {
  const j = q.health.jobs;
  counters($("queue"), [
    ["in queue", "q-in-queue", j.inQueue], ["in progress", "q-in-progress", j.inProgress],
    ["completed", "q-completed", j.completed], ["failed", "q-failed", j.failed], ["retried", "q-retried", j.retried],
  ]);
  $("workers").replaceChildren(...q.workers.map((w) => el("tr", {},
    el("td", { class: "id" }, w.id), el("td", {}, (w.last_ping_ms / 1000).toFixed(1) + " s ago"),
    el("td", {}, w.jobs_held), el("td", {}, w.alive ? (w.status || "ok") : "lost"))));
}

// ---- recent jobs ---------------------------------------------------------------------------

function drawJobs(jobs) {
  $("jobs-hint").textContent = LOCAL ? "(click one for its input and output)" : "(ids, states and timings only)";
  $("jobs").replaceChildren(...jobs.map((job) => {
    const row = el("tr", { "data-job": job.id, "data-status": job.status, class: LOCAL ? "clickable" : "" },
      el("td", { class: "id", title: job.id }, job.id),
      el("td", {}, job.task ?? "–"),
      el("td", { class: "state-" + job.status }, job.status),
      el("td", {}, ms(job.delay_ms)),
      el("td", {}, ms(job.execution_ms)),
      el("td", { class: job.error_type ? "error" : "" }, job.error_type ?? ""),
      el("td", {}, job.retry_after === null || job.retry_after === undefined ? "" : job.retry_after + " s"));
    if (job.id === selectedJob) row.classList.add("selected");
    if (LOCAL) row.addEventListener("click", () => showJob(job.id));
    return row;
  }));
}

async function showJob(id) {
  selectedJob = id;
  $("job-detail").classList.remove("hidden");
  $("detail-id").textContent = id;
  for (const part of ["input", "output"]) {
    $("detail-" + part).textContent = "loading…";
    $("detail-" + part + "-note").textContent = "";
  }
  try {
    const { status, body } = await getJson("/console/api/jobs/" + encodeURIComponent(id));
    if (status !== 200) throw new Error((body && body.error) || "HTTP " + status);
    for (const part of ["input", "output"]) {
      $("detail-" + part).textContent = body[part] ?? "(none)";
      $("detail-" + part + "-note").textContent = body[part + "_truncated"] ? `(first ${body.limit} characters of ${body[part + "_chars"]})` : "";
    }
  } catch (e) {
    if (e instanceof NeedKey) return askForKey("The key was refused.");
    $("detail-input").textContent = "";
    $("detail-output").textContent = String(e.message || e);
  }
}
$("detail-close").addEventListener("click", () => { selectedJob = null; $("job-detail").classList.add("hidden"); });

// ---- submit --------------------------------------------------------------------------------

let samplesLoaded = false;
async function loadSamples() {
  if (!LOCAL || samplesLoaded) return;
  const { body } = await getJson(routes.samples);
  samples = body || {};
  samplesLoaded = true;
  const tasks = [...new Set([...handlerNames, ...Object.keys(samples)])];
  const select = $("submit-task");
  const previous = select.value;
  select.replaceChildren(...tasks.map((t) => el("option", { value: t }, t)));
  select.value = tasks.includes(previous) ? previous : (tasks.includes("classify") ? "classify" : tasks[0]);
  fillSample();
}

function fillSample() {
  const task = $("submit-task").value;
  const input = samples[task] || { task };
  $("submit-body").value = JSON.stringify({ input }, null, 2);
}
$("submit-task").addEventListener("change", fillSample);

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST", cache: "no-store", body,
    headers: { Authorization: "Bearer " + key(), "Content-Type": "application/json" },
  });
  if (response.status === 401) throw new NeedKey();
  return { status: response.status, body: await response.json().catch(() => null) };
}

$("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const route = document.querySelector("input[name=route]:checked").value;
  const button = $("submit-button");
  const state = $("submit-state");
  button.disabled = true;
  $("submit-result").textContent = "";
  $("submit-chunks").textContent = "";
  document.body.dataset.submit = "running";
  try {
    const text = $("submit-body").value;
    try { JSON.parse(text); } catch (e) { throw new Error("not JSON: " + e.message); }
    const api = "/v2/local/";
    state.textContent = route === "runsync" ? "waiting for the result…" : "submitted…";
    let { status, body } = await post(api + route, text);
    if (status >= 400) throw new Error(JSON.stringify(body));
    const id = body.id;
    if (route === "run") {
      state.textContent = `job ${id}: ${body.status}`;
      const chunks = [];
      // /stream is held until there is a chunk or the job has ended (at most 5 s).
      for (;;) {
        const stream = await getJson(api + "stream/" + encodeURIComponent(id));
        if (stream.status !== 200) break;
        for (const c of stream.body.stream || []) chunks.push(JSON.stringify(c.output));
        $("submit-chunks").textContent = chunks.join("\n");
        state.textContent = `job ${id}: ${stream.body.status}`;
        if (FINAL.includes(stream.body.status)) break;
      }
      ({ status, body } = await getJson(api + "status/" + encodeURIComponent(id)));
    }
    $("submit-result").textContent = JSON.stringify(body, null, 2);
    $("submit-result").dataset.status = body.status;
    state.textContent = `job ${id}: ${body.status}`;
    document.body.dataset.submit = body.status;
  } catch (e) {
    if (e instanceof NeedKey) { askForKey("The key was refused."); return; }
    state.textContent = "";
    $("submit-result").textContent = String(e.message || e);
    document.body.dataset.submit = "error";
  } finally {
    button.disabled = false;
  }
});

// ---- polling -------------------------------------------------------------------------------

async function refresh() {
  try {
    const [health, hist, jobs, queue] = await Promise.all([
      getJson(routes.health),
      getJson(routes.history + "?since=" + lastSample),
      getJson(routes.jobs),
      LOCAL ? getJson(routes.queue) : Promise.resolve(null),
    ]);
    const h = health.body || {};
    const pill = $("status");
    const status = health.status === 502 ? "down" : h.status || "unknown";
    pill.textContent = status === "down" ? "worker unreachable" : status + (h.ready === false ? " (not ready)" : "");
    pill.className = "pill " + status;
    $("worker-id").textContent = h.worker_id ? `worker ${h.worker_id} · v${h.version}` : "";
    if (hist.body && Array.isArray(hist.body.samples)) {
      for (const s of hist.body.samples) if (s.t > lastSample) { history.push(s); lastSample = s.t; }
      const oldest = Date.now() - CHART_MS - 60000;
      history = history.filter((s) => s.t >= oldest);
    }
    drawGpus(h.gpus || []);
    drawHandlers(h.handlers || {});
    drawBatching(h.batching || []);
    if (h.jobs) drawWorkerJobs(h.jobs);
    if (queue && queue.body) drawQueue(queue.body);
    drawJobs((jobs.body && jobs.body.jobs) || []);
    await loadSamples();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
  } catch (e) {
    if (e instanceof NeedKey) {
      const refused = key() !== "";
      sessionStorage.removeItem(KEY_STORE);
      askForKey(refused ? "The key was refused." : "");
      clearTimeout(pollTimer);
      return; // polling resumes once a key is given
    }
    $("status").textContent = "no connection";
    $("status").className = "pill down";
  }
  schedule();
}

$("mode").textContent = LOCAL ? "local endpoint" : "worker (read-only)";
$("sources").textContent = Object.values(routes).join(", ");
if (LOCAL && !key()) askForKey(); else refresh();
