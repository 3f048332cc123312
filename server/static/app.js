// vvireid query page: pick frames, POST them to v1/query, show the ranked gallery tracklets.
// Plain browser JavaScript, no build step and nothing fetched from outside this server.
"use strict";

const IMAGE_TYPES = ["image/jpeg", "image/png", "image/webp"];
const IMAGE_NAME = /\.(jpe?g|png|webp)$/i;
const STRIP_MAX = 24;
const $ = (id) => document.getElementById(id);

let chosen = [];
let maxFrames = 64;
let ready = false;
let examplePid = null; // pid of the example being queried: its matches are marked

function isImage(file) {
  return IMAGE_TYPES.includes(file.type) || IMAGE_NAME.test(file.name);
}

function frameName(file) {
  return file.webkitRelativePath || file.relativePath || file.name;
}

function setFrames(files, pid = null) {
  examplePid = pid;
  const byName = (a, b) => frameName(a).localeCompare(frameName(b), undefined, { numeric: true });
  chosen = Array.from(files).filter(isImage).sort(byName);
  const skipped = files.length - chosen.length;
  const strip = $("strip");
  strip.replaceChildren();
  for (const file of chosen.slice(0, STRIP_MAX)) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    img.title = frameName(file);
    img.onload = () => URL.revokeObjectURL(img.src);
    strip.appendChild(img);
  }
  let text = chosen.length ? `${chosen.length} frame(s) chosen` : "No frames chosen.";
  if (chosen.length > STRIP_MAX) text += ` (first ${STRIP_MAX} shown)`;
  if (skipped > 0) text += `; ${skipped} non-image file(s) ignored`;
  if (chosen.length > maxFrames) text += `; the server takes at most ${maxFrames}`;
  $("frame-count").textContent = text;
  updateButton();
}

function updateButton() {
  $("search").disabled = !(ready && chosen.length > 0);
}

// Folders dropped on the page arrive as entries that must be walked.
async function filesFromEntry(entry) {
  if (entry.isFile) {
    return new Promise((resolve) => entry.file((f) => {
      Object.defineProperty(f, "relativePath", { value: entry.fullPath.replace(/^\//, "") });
      resolve([f]);
    }, () => resolve([])));
  }
  if (!entry.isDirectory) return [];
  const reader = entry.createReader();
  const all = [];
  for (;;) {
    const batch = await new Promise((resolve) => reader.readEntries(resolve, () => resolve([])));
    if (!batch.length) break;
    for (const child of batch) all.push(...(await filesFromEntry(child)));
  }
  return all;
}

async function onDrop(event) {
  event.preventDefault();
  $("drop").classList.remove("over");
  const items = Array.from(event.dataTransfer.items || []);
  const entries = items.map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (entries.length) {
    const files = [];
    for (const entry of entries) files.push(...(await filesFromEntry(entry)));
    setFrames(files);
  } else {
    setFrames(event.dataTransfer.files);
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function describeError(status, body) {
  if (body && body.error) {
    const part = body.error.part ? ` [${body.error.part}]` : "";
    const id = body.request_id ? `\nrequest id: ${body.request_id}` : "";
    return `${status} ${body.error.code}${part}: ${body.error.message}${id}`;
  }
  return `HTTP ${status}`;
}

function text(tag, className, content) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  el.textContent = content;
  return el;
}

function matchCard(match) {
  const card = document.createElement("article");
  card.className = "match";
  card.dataset.trackletId = match.tracklet_id;
  card.dataset.rank = match.rank;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = `thumbnail of ${match.tracklet_id}`;
  img.src = match.thumbnail_url;
  img.onerror = () => img.replaceWith(text("span", "hint", "no thumbnail"));
  thumb.append(img, text("span", "rank", `#${match.rank}`));
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.append(text("div", "id", match.tracklet_id));
  const similarity = match.similarity === null || match.similarity === undefined
    ? "" : ` · similarity ${match.similarity.toFixed(3)}`;
  meta.append(text("div", "score", `score ${match.score.toFixed(4)}${similarity}`));
  const where = document.createElement("div");
  where.append(text("span", `tag tag-${match.modality}`, match.modality));
  const camera = match.camera ? `${match.camera} (cam ${match.camid})` : `cam ${match.camid}`;
  where.append(document.createTextNode(` ${camera}`));
  meta.append(where);
  if (match.pid !== null && match.pid !== undefined) {
    meta.append(text("div", "", `pid ${match.pid}`));
    if (examplePid !== null && match.pid === examplePid) {
      card.classList.add("same");
      meta.append(text("div", "same-person", "✓ same person as the example"));
    }
  }
  card.append(thumb, meta);
  return card;
}

// After a failed query the previous matches must not stay on screen next to the error.
function clearResults() {
  $("results").replaceChildren(text("p", "hint", "No results: the last search failed."));
  $("timings").textContent = "";
}

function showResults(body) {
  const results = $("results");
  results.replaceChildren();
  if (!body.matches.length) {
    const none = `No ${body.query.gallery_modality} tracklets match these filters.`;
    results.append(text("p", "hint", none));
  }
  for (const match of body.matches) results.append(matchCard(match));
  const t = body.timings_ms;
  const q = body.query;
  $("timings").textContent =
    `${q.frames} ${q.modality} frames → ${q.gallery_modality} gallery · ` +
    `decode ${t.decode.toFixed(1)} · encode ${t.encode.toFixed(1)} · ` +
    `search ${t.search.toFixed(1)} · total ${t.total.toFixed(1)} ms · batch ${q.batch_size}`;
}

async function search(event) {
  event.preventDefault();
  showError("");
  if (!chosen.length) return showError("Choose at least one frame.");
  const form = new FormData();
  for (const file of chosen) form.append("frames", file, frameName(file));
  form.append("modality", document.querySelector("input[name=modality]:checked").value);
  form.append("top_k", $("top-k").value || "10");
  form.append("cross_modal", $("cross-modal").checked ? "true" : "false");
  if ($("cameras").value.trim()) form.append("camera", $("cameras").value.trim());
  if ($("camid").value.trim()) form.append("camid", $("camid").value.trim());
  const button = $("search");
  button.disabled = true;
  button.textContent = "Searching…";
  try {
    const response = await fetch("v1/query", { method: "POST", body: form });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      clearResults();
      showError(describeError(response.status, body));
    } else showResults(body);
  } catch (err) {
    clearResults();
    showError(`cannot reach the server: ${err}`);
  } finally {
    button.textContent = "Search";
    updateButton();
  }
}

async function pollStatus() {
  const pill = $("status");
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    ready = response.ok;
    const failed = body.status === "failed";
    pill.textContent = ready ? "ready" : failed ? "failed to load" : "loading…";
    pill.className = `pill ${ready ? "pill-ok" : failed ? "pill-bad" : "pill-wait"}`;
    if (body.detail) pill.title = body.detail;
  } catch (err) {
    ready = false;
    pill.textContent = "offline";
    pill.className = "pill pill-bad";
  }
  updateButton();
  if (ready) loadInfo();
  else setTimeout(pollStatus, 1000);
}

async function loadInfo() {
  const response = await fetch("v1/index");
  if (!response.ok) return;
  const info = await response.json();
  if (info.limits) {
    maxFrames = info.limits.max_frames;
    $("top-k").max = info.limits.max_top_k;
  }
  const m = info.model;
  const counts = info.index.per_modality
    ? Object.entries(info.index.per_modality).map(([k, v]) => `${v.count} ${k}`).join(", ")
    : "";
  $("index-info").textContent =
    `Gallery: ${info.index.size} tracklets${counts ? ` (${counts})` : ""} · ` +
    `model ${m.method} ${m.backbone}, ${m.seq_len} frames at ${m.image_size.join("x")}, ` +
    `fingerprint ${m.fingerprint}`;
}

// The demo's example queries (GET v1/examples): one click loads the frames and searches.
async function loadExamples() {
  const response = await fetch("v1/examples").catch(() => null);
  if (!response || !response.ok) return;
  const body = await response.json();
  const list = $("example-list");
  list.replaceChildren();
  for (const example of body.examples) {
    const button = text("button", "button example", example.label);
    button.type = "button";
    button.dataset.example = example.name;
    button.addEventListener("click", () => tryExample(example));
    list.append(button);
  }
  $("examples").hidden = !body.examples.length;
}

async function fetchFrame(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const blob = await response.blob();
  return new File([blob], url.split("/").pop(), { type: blob.type });
}

async function tryExample(example) {
  showError("");
  let files;
  try {
    files = await Promise.all(example.frames.map(fetchFrame));
  } catch (err) {
    return showError(`cannot load the example: ${err.message}`);
  }
  setFrames(files, example.pid ?? null);
  const modality = document.querySelector(`input[name=modality][value=${example.modality}]`);
  if (modality) modality.checked = true;
  $("cross-modal").checked = true;
  $("camid").value = "";
  if (ready) $("query-form").requestSubmit();
}

function init() {
  $("frames").addEventListener("change", (e) => setFrames(e.target.files));
  $("folder").addEventListener("change", (e) => setFrames(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  $("query-form").addEventListener("submit", search);
  pollStatus();
  loadExamples();
}

init();
