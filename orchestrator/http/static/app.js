// PocketLoRA web console: plain DOM, hand-written SVG charts, no dependencies, nothing loaded
// from anywhere but this orchestrator. Every text that came from the API is set as text, never
// as HTML (device-reported strings reach this page).
"use strict";

const STATES = ["QUEUED", "LEASED", "RUNNING", "PAUSED", "UPLOADING", "SUCCEEDED", "FAILED", "CANCELLED"];
const SYNC = ["CONVERGED", "PENDING", "REFUSED", "OFFLINE"];
const ONLINE_S = 120; // as the orchestrator counts devices online
const TOKEN_KEY = "pocketlora.token";
const view = () => document.getElementById("view");
let pageCleanup = [];

// ------------------------------------------------------------------ DOM helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") el.addEventListener("click", v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
const short = (name, prefix) => (name || "").replace(prefix, "");
const stateName = (v) => short(v, "JOB_STATE_") || "UNSPECIFIED";
const chip = (state) => h("span", { class: `chip s-${state}` }, state);
const num = (v) => Number(v || 0);
function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}
const when = (ts) => (ts ? new Date(ts).toLocaleString() : "");

// ------------------------------------------------------------------ API
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
class ApiError extends Error {}
async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { Authorization: `Bearer ${token()}` } });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) { showLogin("The token was refused."); throw new ApiError("unauthenticated"); }
  if (!res.ok) throw new ApiError((body.error && body.error.message) || `HTTP ${res.status}`);
  return body;
}

// Server-sent events over fetch (EventSource cannot send an Authorization header). Reconnects
// with backoff until stop() is called; onJob gets each changed job, onSynced the end of the
// initial batch.
function watchJobs(query, onJob, onSynced) {
  let stopped = false, controller = null, delay = 1000;
  const live = document.getElementById("live");
  async function run() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const res = await fetch(`/api/v1/watch/jobs?${query}`, {
          headers: { Authorization: `Bearer ${token()}` }, signal: controller.signal });
        if (res.status === 401) { showLogin("The token was refused."); return; }
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        live.classList.add("on");
        delay = 1000;
        await readEvents(res.body, (event, data) => {
          if (event === "job") onJob(data);
          else if (event === "synced" && onSynced) onSynced();
        });
      } catch (e) {
        if (stopped) return;
      }
      live.classList.remove("on");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }
  run();
  return () => { stopped = true; if (controller) controller.abort(); live.classList.remove("on"); };
}
async function readEvents(body, handle) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handle(event, JSON.parse(data));
    }
  }
}
function every(ms, fn) { fn(); const id = setInterval(fn, ms); pageCleanup.push(() => clearInterval(id)); }

// ------------------------------------------------------------------ charts
function barChart(id, rows, colours) {
  const width = 420, rowH = 22, labelW = 120, max = Math.max(1, ...rows.map((r) => r[1]));
  const svg = s("svg", { id, width, height: rows.length * rowH + 4, viewBox: `0 0 ${width} ${rows.length * rowH + 4}` });
  rows.forEach(([label, value], i) => {
    const w = ((width - labelW - 50) * value) / max;
    svg.append(s("text", { x: 0, y: i * rowH + 15 }, label));
    svg.append(s("rect", { x: labelW, y: i * rowH + 4, width: Math.max(w, value ? 2 : 0), height: 14, rx: 3,
      fill: colours[label] || "#3b5bdb", "data-label": label, "data-value": value }));
    svg.append(s("text", { x: labelW + w + 6, y: i * rowH + 15 }, String(value)));
  });
  return svg;
}
const STATE_COLOURS = { QUEUED: "#4dabf7", LEASED: "#9775fa", RUNNING: "#51cf66", PAUSED: "#ff922b", UPLOADING: "#20c997",
  SUCCEEDED: "#2f9e44", FAILED: "#e03131", CANCELLED: "#adb5bd" };
const SYNC_COLOURS = { CONVERGED: "#2f9e44", PENDING: "#f08c00", REFUSED: "#e03131", OFFLINE: "#868e96" };

function perMinuteChart(minutes) {
  const width = 420, height = 120, n = Math.max(minutes.length, 1), bw = (width - 30) / n;
  const max = Math.max(1, ...minutes.map((m) => num(m.succeeded) + num(m.failed)));
  const svg = s("svg", { id: "per-minute", width, height: height + 18, viewBox: `0 0 ${width} ${height + 18}` });
  minutes.forEach((m, i) => {
    const ok = (num(m.succeeded) / max) * height, bad = (num(m.failed) / max) * height;
    svg.append(s("rect", { x: 30 + i * bw, y: height - ok, width: bw - 2, height: ok, fill: "#2f9e44" }));
    svg.append(s("rect", { x: 30 + i * bw, y: height - ok - bad, width: bw - 2, height: bad, fill: "#e03131" }));
  });
  svg.append(s("text", { x: 0, y: 10 }, String(max)), s("text", { x: 0, y: height }, "0"),
    s("text", { x: 30, y: height + 14 }, "30 min ago"), s("text", { x: width - 30, y: height + 14 }, "now"));
  return svg;
}

function lossChart(points) {
  const width = 640, height = 240, pad = 40;
  const pts = points.filter((p) => typeof p.loss === "number" && isFinite(p.loss));
  const svg = s("svg", { id: "loss-chart", width, height, viewBox: `0 0 ${width} ${height}`, "data-points": pts.length });
  if (!pts.length) { svg.append(s("text", { x: pad, y: height / 2 }, "no progress reported yet")); return svg; }
  const maxStep = Math.max(1, ...pts.map((p) => num(p.step)));
  const lo = Math.min(...pts.map((p) => p.loss)), hi = Math.max(...pts.map((p) => p.loss));
  const span = hi - lo || 1;
  const x = (p) => pad + ((width - 2 * pad) * num(p.step)) / maxStep;
  const y = (p) => height - pad - ((height - 2 * pad) * (p.loss - lo)) / span;
  svg.append(s("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#adb5bd" }),
    s("line", { x1: pad, y1: pad, x2: pad, y2: height - pad, stroke: "#adb5bd" }),
    s("text", { x: 2, y: pad + 4 }, hi.toFixed(3)), s("text", { x: 2, y: height - pad }, lo.toFixed(3)),
    s("text", { x: width - pad - 40, y: height - pad + 16 }, `step ${maxStep}`), s("text", { x: pad, y: 16 }, "training loss"));
  const attempts = [...new Set(pts.map((p) => num(p.attempt)))];
  const palette = ["#3b5bdb", "#e8590c", "#2f9e44", "#ae3ec9", "#1098ad"];
  attempts.forEach((a, i) => {
    const mine = pts.filter((p) => num(p.attempt) === a);
    svg.append(s("polyline", { fill: "none", stroke: palette[i % palette.length], "stroke-width": 2,
      points: mine.map((p) => `${x(p).toFixed(1)},${y(p).toFixed(1)}`).join(" ") }));
    for (const p of mine)
      svg.append(s("circle", { class: "point", cx: x(p).toFixed(1), cy: y(p).toFixed(1), r: 2.5,
        fill: palette[i % palette.length], "data-step": num(p.step), "data-loss": p.loss }, s("title", {}, `attempt ${a}, step ${num(p.step)}: loss ${p.loss.toFixed(4)}`)));
  });
  return svg;
}

// ------------------------------------------------------------------ pages
async function overview() {
  const root = h("div", {}, h("h1", {}, "Fleet overview"));
  const body = h("div", {});
  root.append(body);
  view().replaceChildren(root);
  every(5000, async () => {
    const sm = await api("/api/v1/summary");
    const jobs = Object.fromEntries(Object.entries(sm.jobs_by_state || {}).map(([k, v]) => [stateName(k), num(v)]));
    const gate = Object.entries(sm.devices_by_eligibility || {}).map(([k, v]) => [short(k, "ELIGIBILITY_REASON_"), num(v)]);
    const sync = SYNC.map((k) => [k, num((sm.devices_by_adapter_sync || {})[k])]);
    const leased = ["LEASED", "RUNNING", "PAUSED", "UPLOADING"].reduce((a, k) => a + (jobs[k] || 0), 0);
    const card = (n, label, id) => h("div", { class: "card", id }, h("div", { class: "n" }, String(n)), h("div", { class: "label" }, label));
    body.replaceChildren(
      h("div", { class: "cards" },
        card(num(sm.device_count), "devices enrolled", "card-devices"), card(num(sm.devices_online), "devices online", "card-online"),
        card(leased, "jobs on devices now", "card-leased"), card(jobs.QUEUED || 0, "jobs queued", "card-queued"),
        card(num(sm.adapter_count), "adapter versions", "card-adapters")),
      h("div", { class: "panels" },
        h("div", { class: "panel" }, h("h2", {}, "Jobs by state"), barChart("jobs-by-state", STATES.map((k) => [k, jobs[k] || 0]), STATE_COLOURS)),
        h("div", { class: "panel" }, h("h2", {}, "Devices by gate reason"), gate.length ? barChart("devices-by-gate", gate, { ELIGIBLE: "#2f9e44" }) : h("p", { class: "muted" }, "no devices enrolled")),
        h("div", { class: "panel" }, h("h2", {}, "Jobs ended per minute (green: succeeded, red: failed)"), perMinuteChart(sm.finished_per_minute || [])),
        h("div", { class: "panel" }, h("h2", {}, "Adapters: devices converged vs pending"), barChart("adapter-sync", sync, SYNC_COLOURS))));
  });
}

function jobRow(j) {
  const p = j.progress || {}, total = num(p.total_steps), step = num(p.step), state = stateName(j.state);
  const bar = h("div", { class: "bar" }, h("div", {}));
  bar.firstChild.style.width = `${total ? Math.min(100, (100 * step) / total) : 0}%`;
  return h("tr", { "data-job-id": j.job_id },
    h("td", { class: "mono" }, h("a", { href: `#/jobs/${encodeURIComponent(j.job_id)}` }, j.job_id)),
    h("td", {}, h("a", { href: `#/devices` }, j.device_id)),
    h("td", { class: "state" }, chip(state)),
    h("td", {}, `${num(j.attempt)}/${num(j.max_attempts)}`),
    h("td", {}, total ? `${step}/${total}` : "-", bar),
    h("td", { class: "loss" }, total && typeof p.loss === "number" ? p.loss.toFixed(3) : "-"),
    h("td", { class: "muted" }, j.status_message || j.last_error || ""));
}

async function jobsPage() {
  const stateSel = h("select", { id: "filter-state" }, h("option", { value: "" }, "any state"), STATES.map((k) => h("option", { value: k }, k)));
  const deviceIn = h("input", { id: "filter-device", placeholder: "device id" });
  const tbody = h("tbody", { id: "jobs-body" });
  const count = h("span", { class: "muted", id: "jobs-count" });
  view().replaceChildren(h("div", {}, h("h1", {}, "Jobs"),
    h("div", { class: "filters" }, stateSel, deviceIn, count),
    h("table", { id: "jobs-table" }, h("thead", {}, h("tr", {}, ["job", "device", "state", "attempt", "progress", "loss", "status"].map((c) => h("th", {}, c)))), tbody)));
  let stop = () => {};
  const restart = () => {
    stop();
    tbody.replaceChildren();
    const q = new URLSearchParams({ include_initial: "true" });
    if (stateSel.value) q.append("state", stateSel.value);
    if (deviceIn.value.trim()) q.append("device_id", deviceIn.value.trim());
    stop = watchJobs(q.toString(), (job) => {
      const row = jobRow(job), old = tbody.querySelector(`tr[data-job-id="${CSS.escape(job.job_id)}"]`);
      const wanted = !stateSel.value || stateName(job.state) === stateSel.value;
      if (old) wanted ? old.replaceWith(row) : old.remove();
      else if (wanted) tbody.prepend(row);
      count.textContent = `${tbody.children.length} job(s), live`;
    }, () => { count.textContent = `${tbody.children.length} job(s), live`; });
  };
  stateSel.addEventListener("change", restart);
  deviceIn.addEventListener("change", restart);
  pageCleanup.push(() => stop());
  restart();
}

async function jobPage(jobId) {
  const root = h("div", {});
  view().replaceChildren(root);
  let pending = null;
  const render = async () => {
    const [{ job }, hist] = await Promise.all([api(`/api/v1/jobs/${encodeURIComponent(jobId)}`), api(`/api/v1/jobs/${encodeURIComponent(jobId)}/history`)]);
    const p = job.progress || {}, state = stateName(job.state);
    const events = hist.events || [], byAttempt = new Map();
    for (const e of events) if (num(e.attempt)) (byAttempt.get(num(e.attempt)) || byAttempt.set(num(e.attempt), []).get(num(e.attempt))).push(e);
    root.replaceChildren(...[
      h("h1", {}, "Job ", h("span", { class: "mono" }, job.job_id), " ", h("span", { id: "job-state" }, chip(state))),
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("div", { class: "label" }, "device"), h("div", {}, job.device_id)),
        h("div", { class: "card" }, h("div", { class: "label" }, "adapter name"), h("div", {}, (job.training || {}).adapter_name || "")),
        h("div", { class: "card" }, h("div", { class: "label" }, "progress"), h("div", { id: "job-progress" }, `${num(p.step)}/${num(p.total_steps)} steps`)),
        h("div", { class: "card" }, h("div", { class: "label" }, "attempt"), h("div", {}, `${num(job.attempt)} of ${num(job.max_attempts)}`)),
        h("div", { class: "card" }, h("div", { class: "label" }, "adapter produced"),
          job.adapter_id ? h("a", { href: `#/adapters`, class: "mono", id: "job-adapter" }, job.adapter_id) : h("span", { class: "muted" }, "none yet"))),
      job.status_message ? h("p", { class: "muted" }, job.status_message) : null,
      h("div", { class: "panels" },
        h("div", { class: "panel" }, h("h2", {}, "Loss curve"), lossChart(hist.points || [])),
        h("div", { class: "panel" }, h("h2", {}, "State timeline"),
          h("ul", { class: "timeline", id: "timeline" }, events.map((e) => h("li", {}, chip(stateName(e.state)), " ", h("span", { class: "muted" }, when(e.at)),
            num(e.attempt) ? ` attempt ${num(e.attempt)}` : "", e.message ? ` — ${e.message}` : ""))))),
      h("h2", {}, "Attempts"),
      h("table", { id: "attempts" }, h("thead", {}, h("tr", {}, ["attempt", "states", "pauses", "ended with"].map((c) => h("th", {}, c)))),
        h("tbody", {}, [...byAttempt.entries()].map(([a, evs]) => {
          const end = evs.find((e) => e.error_class) || evs[evs.length - 1];
          return h("tr", {}, h("td", {}, String(a)), h("td", {}, evs.map((e) => [chip(stateName(e.state)), " "])),
            h("td", {}, String(evs.filter((e) => stateName(e.state) === "PAUSED").length)),
            h("td", { class: end.error_class ? "error" : "" }, end.error_class ? `${short(end.error_class, "ERROR_CLASS_")}: ${end.message}` : stateName(end.state)));
        })))].filter(Boolean));
  };
  await render();
  const job = (await api(`/api/v1/jobs/${encodeURIComponent(jobId)}`)).job;
  const stop = watchJobs(new URLSearchParams({ device_id: job.device_id }).toString(), (changed) => {
    if (changed.job_id !== jobId || pending) return;
    pending = setTimeout(() => { pending = null; render().catch(showError); }, 300);
  });
  pageCleanup.push(() => { stop(); if (pending) clearTimeout(pending); });
}

function syncOf(d) {
  const desired = d.desired_adapter_id || "", active = d.active_adapter_id || "";
  if (desired === active) return ["CONVERGED", desired ? "running the desired adapter" : "base model, as wanted"];
  const refusal = (d.adapter_refusals || []).find((r) => r.adapter_id === desired);
  if (desired && refusal) return ["REFUSED", `refused: ${refusal.reason}`];
  if (!d.last_seen || (Date.now() - Date.parse(d.last_seen)) / 1000 > ONLINE_S) return ["OFFLINE", `not seen since ${ago(d.last_seen)}`];
  return ["PENDING", desired ? "downloading or loading it" : "going back to the base model"];
}

async function devicesPage() {
  const tbody = h("tbody", { id: "devices-body" });
  view().replaceChildren(h("div", {}, h("h1", {}, "Devices"),
    h("table", { id: "devices-table" }, h("thead", {}, h("tr", {}, ["device", "gate", "battery / temp", "last seen", "running job", "desired adapter", "active adapter", "adapter state", ""].map((c) => h("th", {}, c)))), tbody)));
  every(5000, async () => {
    const { devices = [] } = await api("/api/v1/devices?page_size=1000");
    tbody.replaceChildren(...devices.map((d) => {
      const power = d.power || {}, [sync, why] = syncOf(d), reason = short(d.eligibility_reason, "ELIGIBILITY_REASON_") || "UNSPECIFIED";
      const act = (label, path) => h("button", { class: "act", onclick: () => api(path, { method: "POST" }).then(() => devicesPage()).catch(showError) }, label);
      return h("tr", { "data-device-id": d.device_id },
        h("td", { class: "mono" }, d.device_id),
        h("td", {}, h("span", { class: d.eligible ? "sync-CONVERGED" : "sync-PENDING" }, d.eligible ? "may train" : reason), h("div", { class: "muted" }, d.eligibility_detail || "")),
        h("td", {}, `${power.battery_pct !== undefined ? Math.round(power.battery_pct) + "%" : "-"} / ${power.temperature_c !== undefined ? power.temperature_c.toFixed(1) + " °C" : "-"}`, power.charging ? " ⚡" : ""),
        h("td", {}, ago(d.last_seen)),
        h("td", { class: "mono" }, d.running_job_id ? h("a", { href: `#/jobs/${encodeURIComponent(d.running_job_id)}` }, d.running_job_id) : "-"),
        h("td", { class: "mono" }, d.desired_adapter_id || "(base)"),
        h("td", { class: "mono" }, d.active_adapter_id || "(base)"),
        h("td", { class: `sync sync-${sync}` }, sync, h("div", { class: "muted" }, why)),
        h("td", {}, act("rollback", `/api/v1/devices/${encodeURIComponent(d.device_id)}/rollback`), " ",
          act("base model", `/api/v1/devices/${encodeURIComponent(d.device_id)}/deactivate`)));
    }));
  });
}

async function adaptersPage() {
  const tbody = h("tbody", { id: "adapters-body" });
  view().replaceChildren(h("div", {}, h("h1", {}, "Adapters"),
    h("table", { id: "adapters-table" }, h("thead", {}, h("tr", {}, ["adapter", "name", "v", "device", "job", "base model", "dataset", "final loss", "size", "devices", ""].map((c) => h("th", {}, c)))), tbody)));
  every(10000, async () => {
    const [{ adapters = [] }, { devices = [] }] = await Promise.all([api("/api/v1/adapters?page_size=200"), api("/api/v1/devices?page_size=1000")]);
    tbody.replaceChildren(...adapters.flatMap((a) => {
      let manifest = {};
      try { manifest = JSON.parse(a.manifest_json || "{}"); } catch (e) { manifest = {}; }
      const metrics = manifest.reported_metrics || manifest.metrics || {};
      const wanted = devices.filter((d) => d.desired_adapter_id === a.adapter_id).length;
      const running = devices.filter((d) => d.active_adapter_id === a.adapter_id).length;
      const details = h("tr", { hidden: true }, h("td", { colspan: 11 }, h("pre", {}, JSON.stringify(manifest, null, 2))));
      const row = h("tr", { "data-adapter-id": a.adapter_id },
        h("td", { class: "mono" }, h("a", { href: "#/adapters", onclick: (e) => { e.preventDefault(); details.hidden = !details.hidden; } }, a.adapter_id)),
        h("td", {}, a.name), h("td", {}, String(num(a.version))), h("td", { class: "mono" }, a.device_id),
        h("td", { class: "mono" }, h("a", { href: `#/jobs/${encodeURIComponent(a.job_id)}` }, a.job_id)),
        h("td", {}, a.base_model_id), h("td", { class: "mono" }, String(manifest.dataset_sha256 || "").slice(0, 12)),
        h("td", {}, metrics.final_loss !== undefined ? Number(metrics.final_loss).toFixed(3) : "-"),
        h("td", {}, `${(num(a.size_bytes) / 1e6).toFixed(2)} MB`),
        h("td", {}, `${running} running, ${wanted} wanted`),
        h("td", {}, h("button", { class: "act", onclick: () => api(`/api/v1/adapters/${encodeURIComponent(a.adapter_id)}/activate`, { method: "POST" }).then(() => adaptersPage()).catch(showError) }, "activate")));
      return [row, details];
    }));
  });
}

// ------------------------------------------------------------------ shell
function showError(err) {
  if (err instanceof ApiError && err.message === "unauthenticated") return;
  const p = h("p", { class: "error", id: "page-error" }, String(err.message || err));
  const old = document.getElementById("page-error");
  if (old) old.replaceWith(p); else view().prepend(p);
}
function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  view().replaceChildren();
}
function route() {
  pageCleanup.forEach((f) => f());
  pageCleanup = [];
  if (!token()) return showLogin("");
  document.getElementById("login").hidden = true;
  const path = location.hash.replace(/^#/, "") || "/";
  const page = path.startsWith("/jobs/") ? "jobs" : path.slice(1) || "overview";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  let run;
  if (path.startsWith("/jobs/")) run = jobPage(decodeURIComponent(path.slice(6)));
  else run = ({ "/jobs": jobsPage, "/devices": devicesPage, "/adapters": adaptersPage }[path] || overview)();
  Promise.resolve(run).catch(showError);
}
window.addEventListener("unhandledrejection", (e) => { e.preventDefault(); showError(e.reason); });
document.addEventListener("DOMContentLoaded", () => {
  const m = location.hash.match(/^#token=(.+)$/);
  if (m) { sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1])); history.replaceState(null, "", "#/"); }
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    route();
  });
  document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); route(); });
  window.addEventListener("hashchange", route);
  route();
});
