// Kiosk page: upload one radiograph, show the record the service returns, list the recent ones.
// Plain JavaScript, no libraries: the page must work on a box with no internet.
"use strict";

// Class colours: the overlay's Okabe-Ito palette (spine_edge/overlay.py, there in BGR).
const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7"];
const RECENT = 8;
const TOKEN_KEY = "spine-edge-token";

const $ = (id) => document.getElementById(id);
const state = { record: null, heatmap: false, urls: {}, pictures: {} };

// Every data request goes through here: the optional API token travels as a header, so pictures
// are fetched as blobs rather than linked from <img src>.
async function api(path, options = {}) {
  const token = localStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    askToken();
    throw new Error("this service needs its API token");
  }
  return response;
}

function askToken() {
  const dialog = $("token-dialog");
  if (!dialog.open) dialog.showModal();
}

$("token-form").addEventListener("submit", () => {
  localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  refreshStatus();
  refreshRecent();
});

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(showMessage.timer);
  showMessage.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

function ms(value) {
  return value < 10 ? value.toFixed(1) : value.toFixed(0);
}

function outcome(record) {
  if (record.status === "ok") return record.decision ? "abnormal" : "normal";
  return record.status; // "refused" or "error"
}

const LABELS = { abnormal: "Abnormal", normal: "Normal", refused: "Refused", error: "Not readable" };

async function refreshStatus() {
  const box = $("service");
  try {
    const response = await api("/readyz");
    const body = await response.json();
    box.dataset.state = body.ready ? "ready" : "down";
    box.textContent = (body.ready ? "Ready" : "Not ready") +
      ` · ${body.backend} ${body.precision} · bundle ${body.bundle_id}` +
      (body.dicom ? ` · DICOM ${body.dicom.ae_title}@${body.dicom.host}:${body.dicom.port}` : "");
  } catch (err) {
    box.dataset.state = "down";
    box.textContent = "Service unreachable";
  }
}

async function refreshRecent() {
  let records;
  try {
    const response = await api(`/v1/results?limit=${RECENT}`);
    if (!response.ok) return;
    records = (await response.json()).results;
  } catch (err) {
    return;
  }
  const list = $("recent");
  list.replaceChildren();
  if (!records.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "None yet";
    list.append(li);
  }
  for (const record of records) {
    const li = document.createElement("li");
    const kind = outcome(record);
    li.dataset.job = record.job_id || "";
    if (state.record && record.job_id === state.record.job_id) li.classList.add("selected");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = record.received ? new Date(record.received).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false }) : "";
    const chip = document.createElement("span");
    chip.className = "chip " + kind;
    chip.textContent = LABELS[kind].toUpperCase() + (record.probability != null ? ` ${record.probability.toFixed(2)}` : "");
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = (record.meta && (record.meta.filename || record.meta.relative)) || record.origin || "";
    li.append(time, chip, what);
    li.addEventListener("click", () => { if (record.job_id) showRecord(record); });
    list.append(li);
  }
}

async function picture(url) {
  if (!url) return null;
  if (state.pictures[url]) return state.pictures[url];
  const response = await api(url);
  if (!response.ok) return null;
  const blobUrl = URL.createObjectURL(await response.blob());
  state.pictures[url] = blobUrl;
  return blobUrl;
}

function drawBoxes(record) {
  const svg = $("boxes");
  svg.replaceChildren();
  const size = record.image_size;
  if (!size || !record.urls || !record.urls.image) { svg.setAttribute("hidden", ""); return; }
  const [height, width] = size;
  // The boxes are in the radiograph's pixels. The heatmap picture has the same rows but a colour
  // bar on its right, so the drawing area spans the picture shown, and the radiograph its left part.
  const img = $("picture");
  const shownWidth = img.naturalHeight ? Math.max(width, img.naturalWidth * (height / img.naturalHeight)) : width;
  svg.setAttribute("viewBox", `0 0 ${shownWidth} ${height}`);
  // Labels keep one on-screen size whatever the radiograph's resolution.
  const stage = $("stage").getBoundingClientRect();
  const unit = Math.max(shownWidth / Math.max(stage.width, 1), height / Math.max(stage.height, 1));
  const ns = "http://www.w3.org/2000/svg";
  for (const det of record.detections) {
    const [x1, y1, x2, y2] = det.box;
    const color = PALETTE[det.class_id % PALETTE.length];
    const group = document.createElementNS(ns, "g");
    group.setAttribute("class", "detection");
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("class", "box");
    rect.setAttribute("x", x1); rect.setAttribute("y", y1);
    rect.setAttribute("width", Math.max(x2 - x1, 1)); rect.setAttribute("height", Math.max(y2 - y1, 1));
    rect.setAttribute("fill", "none"); rect.setAttribute("stroke", color);
    rect.setAttribute("stroke-width", 3 * unit);
    const text = `${det.class_name} ${det.score.toFixed(2)}`;
    const fontSize = 15 * unit;
    const labelHeight = fontSize * 1.35;
    const top = y1 - labelHeight >= 0 ? y1 - labelHeight : y1;
    const background = document.createElementNS(ns, "rect");
    background.setAttribute("x", x1); background.setAttribute("y", top);
    background.setAttribute("width", text.length * fontSize * 0.62 + 8 * unit); background.setAttribute("height", labelHeight);
    background.setAttribute("fill", color);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("class", "box-label");
    label.setAttribute("x", x1 + 4 * unit); label.setAttribute("y", top + fontSize * 1.05);
    label.setAttribute("font-size", fontSize); label.setAttribute("fill", "#000");
    label.setAttribute("font-family", "DejaVu Sans, sans-serif");
    label.textContent = text;
    group.append(rect, background, label);
    svg.append(group);
  }
  svg.removeAttribute("hidden"); // an <svg> has no .hidden property: it is not an HTMLElement
}

async function showPicture() {
  const record = state.record;
  const img = $("picture");
  const url = state.heatmap ? record.urls.heatmap : record.urls.image;
  const src = await picture(url);
  if (record !== state.record) return; // another result arrived meanwhile
  if (src) {
    if (img.src !== src) {
      img.src = src;
      await img.decode().catch(() => {}); // the boxes need the picture's size
    }
    if (record !== state.record) return;
    img.hidden = false;
    $("placeholder").hidden = true;
    $("stage").classList.add("has-image");
  } else {
    img.hidden = true;
  }
  drawBoxes(record);
}

function showRecord(record) {
  state.record = record;
  state.heatmap = false;
  const kind = outcome(record);
  const card = $("decision-card");
  card.dataset.status = kind;
  $("decision").textContent = LABELS[kind];
  $("probability").textContent = record.probability != null
    ? `p = ${record.probability.toFixed(3)}   (τ = ${record.threshold.toFixed(3)})` : "";
  const reason = record.status === "refused" ? (record.refusal && record.refusal.reason) : record.error;
  $("reason").textContent = reason || "";
  $("reason").hidden = !reason;

  const findings = $("findings");
  findings.replaceChildren();
  $("box-count").textContent = record.status === "ok" ? `(${record.detections.length})` : "";
  if (!record.detections.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = record.status !== "ok" ? "—" : record.detector_ran ? "No lesion boxes" : "Detector not run (normal)";
    findings.append(li);
  }
  for (const det of record.detections) {
    const li = document.createElement("li");
    li.className = "finding";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = PALETTE[det.class_id % PALETTE.length];
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = det.class_name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = det.score.toFixed(2);
    li.append(swatch, name, score);
    findings.append(li);
  }

  const lat = record.latency_ms || {};
  const stages = ["read", "preprocess", "classifier", "detector", "postprocess"]
    .filter((s) => lat[s] != null && lat[s] > 0).map((s) => `${s} ${ms(lat[s])}`).join(" · ");
  const queued = record.queue_ms != null ? ` · queue ${ms(record.queue_ms)}` : "";
  $("latency").innerHTML = "";
  const total = document.createElement("strong");
  total.textContent = lat.total != null ? `${ms(lat.total)} ms` : "—";
  const detail = document.createElement("div");
  detail.className = "stages";
  detail.textContent = stages + queued;
  $("latency").append(total, detail);

  const toggle = $("heatmap-toggle");
  toggle.disabled = !(record.urls && record.urls.heatmap);
  toggle.setAttribute("aria-pressed", "false");
  toggle.title = toggle.disabled ? "A heatmap is drawn for abnormal results only" : "";
  for (const li of $("recent").children) li.classList.toggle("selected", li.dataset.job === record.job_id);
  if (record.urls && record.urls.image) {
    showPicture();
  } else {
    $("picture").hidden = true;
    $("boxes").setAttribute("hidden", "");
    $("placeholder").hidden = false;
    $("stage").classList.remove("has-image");
  }
}

async function upload(file) {
  if (!file) return;
  $("busy").hidden = false;
  $("message").hidden = true;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await api("/v1/predict", { method: "POST", body: form });
    const body = await response.json();
    if (response.ok || response.status === 422) {
      showRecord(body); // 422: unreadable file; the record carries the reader's reason
    } else if (response.status === 503) {
      showMessage(`${body.detail} (retry in ${response.headers.get("Retry-After") || "a few"} s)`);
    } else {
      showMessage(body.detail || `the service answered ${response.status}`);
    }
  } catch (err) {
    showMessage(`Upload failed: ${err.message}`);
  } finally {
    $("busy").hidden = true;
    $("file").value = "";
    refreshRecent();
  }
}

$("file").addEventListener("change", (event) => upload(event.target.files[0]));

$("heatmap-toggle").addEventListener("click", () => {
  if (!state.record || $("heatmap-toggle").disabled) return;
  state.heatmap = !state.heatmap;
  $("heatmap-toggle").setAttribute("aria-pressed", String(state.heatmap));
  showPicture();
});

const stage = $("stage");
for (const name of ["dragenter", "dragover"]) {
  document.addEventListener(name, (event) => { event.preventDefault(); stage.classList.add("dragging"); });
}
for (const name of ["dragleave", "drop"]) {
  document.addEventListener(name, (event) => { event.preventDefault(); stage.classList.remove("dragging"); });
}
document.addEventListener("drop", (event) => upload(event.dataTransfer.files[0]));
window.addEventListener("resize", () => { if (state.record) drawBoxes(state.record); });

refreshStatus();
refreshRecent();
// Results from the watch folder or the DICOM listener show up without touching the screen.
setInterval(() => { refreshStatus(); refreshRecent(); }, 10000);
