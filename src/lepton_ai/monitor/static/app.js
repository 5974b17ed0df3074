// lepton_ai dashboard: polls api/snapshot once a second while the tab is visible and
// renders it. Data goes into the page as text nodes only (never innerHTML), so a job
// name or an event detail cannot inject markup.
"use strict";

const POLL_MS = 1000;
const EVENTS_SHOWN_MAX = 200;
const SEEN_KEYS_MAX = 2000; // event first-seen times kept for the latency figures
// An event's phase comes with it (lepton_ai.monitor.events.EventKind.phase).
const PHASE_CLASS = { fault: "fault", detection: "detect", healing: "heal" };
const OUTCOME_COLOURS = { succeeded: "#2e9d5b", running: "#3b7dd8", failed: "#d64545",
  user_error: "#d64545", lost: "#e08a1e", cancelled: "#9aa1ad" };
const TIMELINE_WIDTH_MIN = 480;

// What a test or a curious user can read: first render time, when each event was
// first shown, and the lag from its cluster timestamp to the screen.
const metrics = { firstRenderMs: null, renders: 0, eventSeenAt: {}, eventLagMs: [] };
window.__lepton = metrics;

let selectedJob = null;
let timer = null;
let polling = false; // one poll at a time, whatever wakes it
let tasksEnabled = false;
let jobStatus = {}; // job id -> status, from the last snapshot

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function clock(t) {
  const d = new Date(t * 1000);
  const p = (n, w) => String(n).padStart(w || 2, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fillBody(table, rows) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...rows);
}

async function getJson(url) {
  const reply = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (reply.status === 401) {
    window.location.href = "login"; // the session expired or was never made
    throw new Error("not logged in");
  }
  if (!reply.ok) throw new Error(`${url}: HTTP ${reply.status}`);
  return reply.json();
}

// ------------------------------------------------------------------ panels

function renderHeader(s) {
  document.getElementById("cluster-address").textContent = s.address;
  document.getElementById("leader").textContent = s.leader ? `leader ${s.leader}` : "no leader";
  const age = Date.now() / 1000 - s.fetched_at;
  document.getElementById("freshness").textContent =
    age > 3 ? `stale: ${age.toFixed(0)} s old` : `updated ${clock(s.fetched_at)}`;
  const links = [];
  for (const url of s.links.metrics_urls || []) {
    links.push(el("a", { href: url, title: url }, `metrics ${new URL(url).host}`));
  }
  document.getElementById("links").replaceChildren(...links);
  const errors = Object.entries(s.errors || {});
  const box = document.getElementById("errors");
  box.hidden = errors.length === 0;
  box.replaceChildren(...errors.map(([k, v]) => el("div", {}, `${k}: ${v}`)));
}

function renderMembers(members) {
  fillBody("members", members.map((m) => el("tr", { "data-role": m.role, "data-id": m.id },
    el("td", {}, m.role), el("td", {}, m.id), el("td", {}, m.node || ""),
    el("td", {}, m.pid || ""), el("td", {}, m.address || ""),
    el("td", { class: `health health-${m.health}` }, m.health),
    el("td", {}, m.restarts ?? 0),
    el("td", {}, m.phi !== undefined ? Number(m.phi).toFixed(2) : ""),
    el("td", { class: "muted" }, m.last_exit || ""))));
}

function progressBar(job) {
  const bar = el("span", { class: `bar ${job.status}` }, el("span"));
  bar.firstChild.style.width = `${Math.min(100, job.percent)}%`;
  const text = el("span", { class: "pct" }, `${job.done}/${job.total} (${job.percent.toFixed(0)}%)`);
  return el("td", { class: "progress" }, bar, text);
}

function stagesText(job) {
  if (!job.stages) return "";
  return job.stages.map((st) => `s${st.stage} ${st.done}/${st.seen}` +
    (st.failed ? ` (${st.failed} failed)` : "")).join(", ");
}

function renderJobs(jobs) {
  if (selectedJob === null && jobs.length) selectedJob = jobs[0].job_id;
  jobStatus = Object.fromEntries(jobs.map((j) => [j.job_id, j.status]));
  fillBody("jobs", jobs.map((j) => {
    const row = el("tr", { class: `job${j.job_id === selectedJob ? " selected" : ""}`,
      "data-job-id": j.job_id, "data-status": j.status },
    el("td", {}, j.job_id), el("td", {}, j.name || ""), el("td", {}, j.status),
    progressBar(j), el("td", { class: "muted" }, stagesText(j)),
    el("td", {}, j.submitted_at ? clock(j.submitted_at) : ""),
    el("td", {}, j.duration_s !== null ? `${j.duration_s.toFixed(2)} s` : ""));
    row.addEventListener("click", () => { selectedJob = j.job_id; refreshTimeline(); });
    return row;
  }));
}

function eventClass(phase) {
  return PHASE_CLASS[phase] || "info";
}

function noteSeen(e, key, now) {
  if (key in metrics.eventSeenAt) return;
  metrics.eventSeenAt[key] = now;
  metrics.eventLagMs.push({ kind: e.kind, lagMs: now - e.t * 1000 });
  const keys = Object.keys(metrics.eventSeenAt);
  if (keys.length > SEEN_KEYS_MAX) delete metrics.eventSeenAt[keys[0]];
  if (metrics.eventLagMs.length > SEEN_KEYS_MAX) metrics.eventLagMs.shift();
}

function renderEvents(events) {
  const now = Date.now();
  const shown = events.slice(-EVENTS_SHOWN_MAX).reverse(); // newest first
  document.getElementById("events").replaceChildren(...shown.map((e) => {
    const key = `${e.t}|${e.kind}|${e.detail}`;
    noteSeen(e, key, now);
    return el("li", { class: eventClass(e.phase), "data-kind": e.kind },
      el("span", { class: "muted" }, `${clock(e.t)} `), el("span", { class: "kind" }, e.kind),
      ` ${e.detail || ""}${e.job_id ? ` [${e.job_id}]` : ""}`);
  }));
}

function kvList(pairs) {
  const dl = el("dl", { class: "kv" });
  for (const [k, v] of pairs) dl.append(el("dt", {}, k), v instanceof Node ? el("dd", {}, v) : el("dd", {}, v));
  return dl;
}

function renderPaxos(p) {
  const rows = [["leader", p.leader || "none"],
    ["voters up", `${p.up} of ${p.coordinators.length} (quorum ${p.quorum})`],
    ["elections seen", p.elections]];
  if (p.last_election) rows.push(["last election", `${clock(p.last_election.t)} ${p.last_election.detail}`]);
  for (const c of p.coordinators) {
    const extra = ["commit_index", "commit_latency_ms", "epoch"].filter((k) => c[k] !== undefined)
      .map((k) => `${k} ${c[k]}`).join(", ");
    rows.push([`coordinator ${c.id}`, el("span", {}, el("span", { class: `health-${c.health}` }, c.health),
      ` ${c.address} paxos ${c.paxos || "-"}${extra ? ` (${extra})` : ""}`)]);
  }
  document.getElementById("paxos").replaceChildren(kvList(rows));
}

function renderDeployments(deps) {
  fillBody("deployments", deps.map((d) => el("tr", { "data-name": d.name },
    el("td", {}, d.name), el("td", {}, `v${d.version}`),
    el("td", { class: d.ready >= d.replicas ? "ok" : "bad" }, `${d.ready}/${d.replicas}`),
    el("td", {}, d.requests_per_s !== undefined ? Number(d.requests_per_s).toFixed(1) : "-"),
    el("td", {}, d.latency_ms !== undefined ? `${Number(d.latency_ms).toFixed(1)} ms` : "-"),
    el("td", {}, ...d.urls.map((u) => el("div", {}, u))))));
}

function renderStorage(st) {
  const summary = document.getElementById("storage-summary");
  if (!st) { summary.textContent = "unavailable"; fillBody("storage", []); return; }
  const health = st.healthy ? el("span", { class: "ok" }, "all objects fully replicated")
    : el("span", { class: "bad" }, `${st.under_replicated} under-replicated, ${st.lost} lost`);
  summary.replaceChildren(kvList([["objects", `${st.objects} (${bytes(st.bytes)} with copies)`],
    ["replication", health], ["copies in flight", st.copies_inflight]]));
  fillBody("storage", st.nodes.map((n) => el("tr", {},
    el("td", {}, n.node), el("td", {}, n.worker), el("td", {}, n.objects),
    el("td", {}, bytes(n.used_bytes)), el("td", {}, bytes(n.capacity_bytes)))));
}

// ------------------------------------------------------------------ task timeline

function settled(tasks, running) {
  // Attempts of a job that has ended but never reported (their worker died, the
  // leader changed) are drawn as lost, ending with the job's last report.
  if (running) return tasks;
  const last = Math.max(...tasks.map((t) => t.ended ?? t.started));
  return tasks.map((t) => (t.ended === null ? { ...t, ended: last, outcome: "lost" } : t));
}

function lanes(tasks, now) {
  // One row per worker; attempts that overlap on it (several slots, a backup) go on
  // lanes of their own within the row, first free lane first.
  const rows = new Map();
  for (const t of [...tasks].sort((a, b) => a.started - b.started)) {
    const ends = rows.get(t.worker) || [];
    let lane = ends.findIndex((end) => end <= t.started);
    if (lane < 0) { lane = ends.length; ends.push(0); }
    ends[lane] = t.ended ?? now;
    rows.set(t.worker, ends);
    t.lane = lane;
  }
  let offset = 0;
  const top = new Map();
  for (const w of [...rows.keys()].sort()) { top.set(w, offset); offset += rows.get(w).length; }
  return { top, count: rows, total: offset };
}

function timelineSvg(tasks, width) {
  const now = Date.now() / 1000;
  const layout = lanes(tasks, now);
  const t0 = Math.min(...tasks.map((t) => t.started));
  const t1 = Math.max(...tasks.map((t) => t.ended ?? now));
  const left = 130, laneH = 18, top = 18;
  const scale = (width - left - 10) / Math.max(t1 - t0, 1e-3);
  const height = top + layout.total * laneH + 6;
  // Speculative backups: stripes of their outcome's colour.
  const patterns = Object.entries(OUTCOME_COLOURS).map(([outcome, colour]) =>
    svg("pattern", { id: `spec-${outcome}`, width: 6, height: 6,
      patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" },
    svg("rect", { width: 6, height: 6, fill: "#ffffff" }), svg("rect", { width: 3, height: 6, fill: colour })));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" },
    svg("defs", {}, ...patterns));
  root.append(svg("text", { x: left, y: 12 }, document.createTextNode(`${clock(t0)}  (+${(t1 - t0).toFixed(2)} s)`)));
  for (const [w, first] of layout.top) {
    const y = top + first * laneH;
    const bottom = y + layout.count.get(w).length * laneH;
    root.append(svg("text", { x: 4, y: y + 13 }, document.createTextNode(w || "?")),
      svg("line", { class: "axis", x1: 0, x2: width - 10, y1: bottom, y2: bottom }));
  }
  for (const t of tasks) {
    const x = left + (t.started - t0) * scale;
    // 1 px short: back-to-back attempts stay apart.
    const w = Math.max(2, ((t.ended ?? now) - t.started) * scale - 1);
    const y = top + (layout.top.get(t.worker) + t.lane) * laneH + 3;
    const known = t.outcome in OUTCOME_COLOURS;
    const fill = t.speculative && known ? `url(#spec-${t.outcome})` : OUTCOME_COLOURS[t.outcome] || "#6b7385";
    const rect = svg("rect", { x, y, width: w, height: laneH - 6, rx: 2, fill,
      class: `task ${t.outcome}${t.retry ? " retry" : ""}${t.speculative ? " speculative" : ""}` });
    const took = t.ended ? `${(t.ended - t.started).toFixed(3)} s` : "running";
    rect.append(svg("title", {}, document.createTextNode(
      `stage ${t.stage} partition ${t.partition} attempt ${t.attempt}${t.retry ? " (retry)" : ""}` +
      `${t.speculative ? " (speculative)" : ""}: ${t.outcome}, ${took}`)));
    root.append(rect);
  }
  return root;
}

async function refreshTimeline() {
  document.querySelectorAll("tr.job").forEach((r) =>
    r.classList.toggle("selected", r.dataset.jobId === selectedJob));
  const box = document.getElementById("timeline-box");
  document.getElementById("timeline-missing").hidden = tasksEnabled || selectedJob === null;
  if (!tasksEnabled || selectedJob === null) { box.hidden = true; return; }
  const reply = await getJson(`api/jobs/${encodeURIComponent(selectedJob)}/tasks`);
  if (!reply.tasks || reply.tasks.length === 0) { box.hidden = true; return; }
  document.getElementById("timeline-job").textContent = reply.job_id;
  box.hidden = false; // before measuring: a hidden box has no width
  const chart = document.getElementById("timeline");
  const tasks = settled(reply.tasks, jobStatus[reply.job_id] === "running");
  chart.replaceChildren(timelineSvg(tasks, Math.max(TIMELINE_WIDTH_MIN, chart.clientWidth)));
}

// ------------------------------------------------------------------ the loop

function render(s) {
  renderHeader(s);
  renderMembers(s.members);
  renderJobs(s.jobs);
  renderEvents(s.events);
  renderPaxos(s.paxos);
  renderDeployments(s.deployments);
  renderStorage(s.storage);
  tasksEnabled = Boolean(s.features && s.features.job_tasks);
  metrics.renders += 1;
  if (metrics.firstRenderMs === null) metrics.firstRenderMs = performance.now();
  document.body.dataset.renders = String(metrics.renders);
}

async function poll() {
  timer = null;
  if (polling) return;
  polling = true;
  try {
    render(await getJson("api/snapshot"));
    await refreshTimeline();
  } catch (err) {
    const box = document.getElementById("errors");
    box.hidden = false;
    box.replaceChildren(el("div", {}, `dashboard: ${err.message}`));
  } finally {
    polling = false;
  }
  schedule();
}

function schedule() {
  // A hidden tab does not poll: nobody is looking, and the cluster is spared.
  if (timer === null && !document.hidden) timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden && timer !== null) { clearTimeout(timer); timer = null; }
  else if (!document.hidden && timer === null) poll();
});

poll();
