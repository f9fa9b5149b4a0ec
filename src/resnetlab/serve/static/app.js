// resnetlab serve page: upload or draw -> POST /v1/explain -> top-5 bars + Grad-CAM overlay.
// No framework and no build step; everything comes from this server (works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const TOPK = 5;
const DRAW_DEBOUNCE_MS = 250; // predict this long after the last stroke moved
let requestSeq = 0; // only the newest answer is shown (drawing sends many)
let modelInfo = null;

function setState(state, message, isError) {
  document.body.dataset.state = state;
  const status = $("status");
  status.textContent = message || "";
  status.classList.toggle("error", Boolean(isError));
}

function percent(p) {
  return (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%";
}

function renderBars(top) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const t of top) {
    const li = document.createElement("li");
    li.dataset.label = t.label;
    li.dataset.probability = String(t.probability);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = t.label;
    label.title = t.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = (100 * t.probability).toFixed(1) + "%";
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(t.probability);
    li.append(label, track, pct);
    bars.append(li);
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

async function explain(blob, name) {
  const seq = ++requestSeq;
  setState("busy", `asking the network about ${name}…`);
  const form = new FormData();
  form.append("file", blob, name);
  let response;
  try {
    response = await fetch(`/v1/explain?topk=${TOPK}`, { method: "POST", body: form });
  } catch (err) {
    if (seq === requestSeq) setState("error", `cannot reach the server (${err.message})`, true);
    return;
  }
  if (seq !== requestSeq) return; // a newer drawing or upload is on its way
  if (!response.ok) {
    setState("error", await errorMessage(response), true);
    return;
  }
  const answer = await response.json();
  const result = answer.results[0];
  const best = result.top[0];
  $("prediction").textContent = `${best.label} (${percent(best.probability)})`;
  $("prediction").dataset.label = best.label;
  renderBars(result.top);
  $("overlay").src = result.overlay_png;
  $("legend").hidden = false;
  $("overlay-caption").textContent = `where the network looked for “${result.target.label}” (Grad-CAM)`;
  const how = result.preprocess ? ` (${result.preprocess})` : "";
  setState("done", `${name}: ${answer.model} says ${best.label}${how}`);
}

function showFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setState("error", `${file.name} is not an image (${file.type})`, true);
    return;
  }
  const preview = $("preview");
  if (preview.dataset.url) URL.revokeObjectURL(preview.dataset.url);
  preview.dataset.url = URL.createObjectURL(file);
  preview.src = preview.dataset.url;
  explain(file, file.name);
}

function setUpUpload() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => showFile(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => showFile(e.dataTransfer.files[0]));
}

// Drawing: dark ink on white paper, like a pen; the server turns it into the training data's
// polarity (light ink on dark) with the same rule it applies to uploaded scans.
function setUpDrawing() {
  $("draw").hidden = false;
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  let drawing = false;
  let inked = false;
  let timer = null;
  const clear = () => {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    inked = false;
  };
  const point = (e) => {
    const r = pad.getBoundingClientRect();
    return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
  };
  const schedule = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (!inked) return;
      pad.toBlob((blob) => {
        $("preview").src = pad.toDataURL("image/png");
        explain(blob, "drawing.png");
      }, "image/png");
    }, DRAW_DEBOUNCE_MS);
  };
  clear();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000";
  ctx.lineWidth = pad.width / 6; // thick: a thin stroke averages down to faint 8x8 pixels
  pad.addEventListener("pointerdown", (e) => {
    drawing = true;
    pad.setPointerCapture(e.pointerId);
    const [x, y] = point(e);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 0.01, y);
    ctx.stroke();
    inked = true;
    schedule();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const [x, y] = point(e);
    ctx.lineTo(x, y);
    ctx.stroke();
    schedule();
  });
  for (const type of ["pointerup", "pointercancel"]) {
    pad.addEventListener(type, () => { drawing = false; });
  }
  $("clear").addEventListener("click", () => {
    clear();
    requestSeq++;
    $("bars").replaceChildren();
    $("prediction").textContent = "";
    $("preview").removeAttribute("src");
    $("overlay").removeAttribute("src");
    $("legend").hidden = true;
    setState("idle", "");
  });
}

// The last minute of serving, from GET /v1/stats: were requests batched, and how fast.
async function refreshStats() {
  try {
    const response = await fetch("/v1/stats");
    if (!response.ok) return;
    const s = await response.json();
    const ms = (v) => (v === null ? "–" : v < 10 ? v.toFixed(1) : v.toFixed(0));
    $("stats").textContent = s.batches === 0 ? "last minute: no predictions yet" :
      `last minute: ${s.images} images in ${s.batches} forward passes, batch size ` +
      `${s.mean_batch_size.toFixed(1)} on average (max ${s.max_batch_size} of ${s.max_batch}), ` +
      `${s.images_per_second.toFixed(2)} images/s, latency p50 ${ms(s.latency_ms.p50)} ms, ` +
      `p99 ${ms(s.latency_ms.p99)} ms`;
  } catch (_) { /* the server is gone or restarting: keep the last numbers */ }
}

// Class names when the run carries them (an imported ImageNet net with --classes), else say so.
// (Digit datasets are named by their digits: "0".."9" are names there.)
function describeClasses(m, digitLike) {
  const named = digitLike || m.classes.some((c, i) => c !== String(i));
  if (!named) return `${m.num_classes} classes (ids only)`;
  const shown = m.classes.slice(0, 4).join(", ");
  return `${m.num_classes} classes (${shown}${m.num_classes > 4 ? ", …" : ""})`;
}

async function start() {
  setUpUpload();
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(await errorMessage(response));
    modelInfo = await response.json();
  } catch (err) {
    setState("error", `cannot load the model description (${err.message})`, true);
    return;
  }
  const m = modelInfo;
  const digitLike = Boolean(m.digit_like);
  $("model").textContent = `${m.model} on ${m.dataset}: ${describeClasses(m, digitLike)}, ` +
    `${m.input_size[0]}×${m.input_size[1]} input, ${(m.parameters / 1e6).toFixed(2)}M parameters, ` +
    `${m.backend} backend`;
  if (m.in_chans === 1) setUpDrawing();
  if (digitLike && m.centre) $("draw").querySelector("p").textContent = "…or draw (any size, anywhere: it is framed as the dataset was)";
  refreshStats();
  setInterval(refreshStats, 2000);
  setState("idle", "");
}

start();
