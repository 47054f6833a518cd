// The page at /: send an image to POST /predict, draw the instances' masks and boxes over it,
// list them, filter them with a score threshold, download the JSON. Same-origin only, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { answer: null, bitmap: null, base: null, instances: [], threshold: 0.5 };

// COCO compressed RLE ("counts" string) -> run lengths, alternating 0s and 1s, column-major.
function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Runs of 1s as [start, length] pairs (column-major pixel indices) and their total area.
function maskRuns(rle) {
  const counts = decodeCounts(rle.counts);
  const runs = [];
  let at = 0, area = 0;
  counts.forEach((n, i) => {
    if (i % 2 === 1 && n > 0) { runs.push(at, n); area += n; }
    at += n;
  });
  return { runs, area };
}

function color(i) {
  const hue = (0.1 + i * 0.618033988749895) % 1;
  return `hsl(${Math.round(hue * 360)}, 85%, ${i % 2 ? 45 : 55}%)`;
}

function rgb(css) {
  const probe = document.createElement("canvas").getContext("2d");
  probe.fillStyle = css;
  probe.fillRect(0, 0, 1, 1);
  return probe.getImageData(0, 0, 1, 1).data;
}

function visible() {
  return state.instances.filter((d) => d.score === null || d.score >= state.threshold);
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pixels = new ImageData(new Uint8ClampedArray(state.base.data), width, height);
  const shown = visible();
  for (const d of shown.slice().reverse()) {  // lowest score first: the best on top
    const [r, g, b] = d.rgb;
    for (let j = 0; j < d.runs.length; j += 2) {
      for (let q = d.runs[j], end = q + d.runs[j + 1]; q < end; q += 1) {
        const o = ((q % height) * width + Math.floor(q / height)) * 4;
        pixels.data[o] = (pixels.data[o] + r) >> 1;
        pixels.data[o + 1] = (pixels.data[o + 1] + g) >> 1;
        pixels.data[o + 2] = (pixels.data[o + 2] + b) >> 1;
      }
    }
  }
  ctx.putImageData(pixels, 0, 0);
  ctx.lineWidth = Math.max(1, Math.round(Math.min(width, height) / 300));
  for (const d of shown) {
    const [x0, y0, x1, y1] = d.box;
    ctx.strokeStyle = d.css;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  listInstances(shown);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function listInstances(shown) {
  const body = $("instances").tBodies[0];
  body.replaceChildren();
  for (const d of shown) {
    const row = body.insertRow();
    row.dataset.index = String(d.index);
    cell(row, String(d.index + 1), "number").style.borderLeft = `0.6em solid ${d.css}`;
    cell(row, d.class_name);
    cell(row, d.score === null ? "" : d.score.toFixed(3), "number");
    cell(row, String(d.area), "number");
  }
  const total = state.instances.length;
  status(`${shown.length} of ${total} instances at score ≥ ${state.threshold.toFixed(3)}`);
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function setThreshold(value) {
  state.threshold = Number(value);
  $("threshold").value = String(value);
  $("threshold-value").textContent = state.threshold.toFixed(3);
}

async function segment(file) {
  status(`segmenting ${file.name}…`);
  $("download").disabled = true;
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const response = await fetch("/predict?score_threshold=0", {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream", Accept: "application/json" },
    body: file,
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.detail || `HTTP ${response.status}`);
  const canvas = $("canvas");
  canvas.width = answer.image.width;
  canvas.height = answer.image.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  state.base = ctx.getImageData(0, 0, canvas.width, canvas.height);
  state.answer = answer;
  state.instances = answer.instances.map((d, index) => {
    const css = color(index);
    const mask = d.mask ? maskRuns(d.mask) : { runs: [], area: 0 };
    return { ...d, index, css, rgb: rgb(css), runs: mask.runs, area: mask.area };
  });
  $("download").disabled = false;
  draw();
}

function download() {
  const kept = state.answer.instances.filter((d) => d.score === null || d.score >= state.threshold);
  const document_ = { ...state.answer, score_threshold: state.threshold, instances: kept };
  const blob = new Blob([JSON.stringify(document_)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "prediction.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function pick(files) {
  if (!files || files.length === 0) return;
  segment(files[0]).catch((e) => status(`error: ${e.message}`, true));
}

async function describeModel() {
  const info = await (await fetch("/model")).json();
  const kind = info.config.model.kind;
  $("model").textContent = `${kind}, ${info.class_names.length} classes, on ${info.device}`;
  setThreshold(info.score_threshold);
}

function main() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => pick(e.target.files));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files);
  });
  let pending = false;
  $("threshold").addEventListener("input", (e) => {
    setThreshold(e.target.value);
    if (state.answer && !pending) {
      pending = true;
      requestAnimationFrame(() => { pending = false; draw(); });
    }
  });
  $("download").addEventListener("click", download);
  describeModel().catch((e) => status(`error: ${e.message}`, true));
}

main();
