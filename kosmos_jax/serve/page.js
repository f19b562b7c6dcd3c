// The page's logic: picture in, one POST /v1/generate, answer out with its boxes.
// Boxes are [x1, y1, x2, y2] fractions of the picture, so they are drawn as
// percentages of the overlay that covers the <img>: no rescaling on resize.
"use strict";

const COLORS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46b4b4",
  "#f032e6", "#8c9a1e", "#d2691e", "#008080"];
const OPTIONS = ["max_new_tokens", "num_beams", "temperature", "top_p", "top_k",
  "no_repeat_ngram_size", "repetition_penalty", "seed"];
const FLOATS = ["temperature", "top_p", "repetition_penalty"];
const DISPLAY = 560; // the picture's longest side on screen, in CSS pixels
const $ = (id) => document.getElementById(id);
const state = { image: null, box: null, result: null };

// --- the picture -------------------------------------------------------------

function setImage(dataUrl) {
  state.image = dataUrl;
  state.box = null;
  showResult(null);
  drawUserBox();
  const img = $("picture");
  img.onload = () => {
    const scale = DISPLAY / Math.max(img.naturalWidth, img.naturalHeight);
    img.style.width = `${Math.round(img.naturalWidth * scale)}px`;
    img.style.height = `${Math.round(img.naturalHeight * scale)}px`;
    $("stage").classList.remove("empty");
  };
  img.src = dataUrl;
}

function readFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => readFile(e.target.files[0]));
const stage = $("stage");
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("drag"); });
stage.addEventListener("dragleave", () => stage.classList.remove("drag"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("drag");
  readFile(e.dataTransfer.files[0]);
});

async function loadExamples() {
  const examples = await (await fetch("/v1/examples")).json();
  for (const example of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = example.caption;
    button.className = "example";
    button.innerHTML = `<img alt="${example.name}" src="${example.image}">`;
    button.addEventListener("click", () => {
      setImage(example.image);
      $("phrase").value = example.objects[0].expression;
    });
    $("examples").appendChild(button);
  }
}

// --- the task form -----------------------------------------------------------

const drawsBox = () => ["reg", "free"].includes($("task").value);

function showTaskFields() {
  const task = $("task").value;
  for (const el of document.querySelectorAll("[data-for]")) {
    el.hidden = !el.dataset.for.split(" ").includes(task);
  }
  $("overlay").classList.toggle("drawing", drawsBox());
  drawUserBox();
}
$("task").addEventListener("change", showTaskFields);

function requestBody() {
  const task = $("task").value;
  const body = { image: state.image, task };
  const fields = { rec: ["phrase"], grounding: ["phrase", "context"], vqa: ["question"],
    free: ["prompt"] }[task] || [];
  for (const name of fields) {
    const value = $(name).value.trim();
    if (value) body[name] = value;
  }
  if (drawsBox() && state.box) body.box = state.box.map((v) => Number(v.toFixed(4)));
  for (const name of OPTIONS) {
    const text = $(name).value.trim();
    if (text !== "") body[name] = FLOATS.includes(name) ? parseFloat(text) : parseInt(text, 10);
  }
  if ($("do_sample").checked) body.do_sample = true;
  return body;
}

// --- drawing a box (REG) -----------------------------------------------------

const clamp = (v) => Math.min(1, Math.max(0, v));
function fraction(e) {
  const rect = $("overlay").getBoundingClientRect();
  return [clamp((e.clientX - rect.left) / rect.width), clamp((e.clientY - rect.top) / rect.height)];
}

let anchor = null;
const overlay = $("overlay");
overlay.addEventListener("pointerdown", (e) => {
  if (!drawsBox() || !state.image) return;
  e.preventDefault();
  overlay.setPointerCapture(e.pointerId);
  anchor = fraction(e);
  state.box = null;
});
overlay.addEventListener("pointermove", (e) => {
  if (!anchor) return;
  const [x, y] = fraction(e);
  state.box = [Math.min(anchor[0], x), Math.min(anchor[1], y), Math.max(anchor[0], x),
    Math.max(anchor[1], y)];
  drawUserBox();
});
overlay.addEventListener("pointerup", () => {
  anchor = null;
  const b = state.box;
  if (b && (b[2] - b[0] < 0.01 || b[3] - b[1] < 0.01)) state.box = null; // a click, not a box
  drawUserBox();
});
$("clear-box").addEventListener("click", () => { state.box = null; drawUserBox(); });

function place(div, box) {
  div.style.left = `${box[0] * 100}%`;
  div.style.top = `${box[1] * 100}%`;
  div.style.width = `${(box[2] - box[0]) * 100}%`;
  div.style.height = `${(box[3] - box[1]) * 100}%`;
}

function drawUserBox() {
  let div = $("user-box");
  if (!state.box || !drawsBox()) {
    if (div) div.remove();
    $("box-text").textContent = "No box yet.";
    return;
  }
  if (!div) {
    div = document.createElement("div");
    div.id = "user-box";
    div.className = "box user";
    overlay.appendChild(div);
  }
  place(div, state.box);
  $("box-text").textContent = `Box: [${state.box.map((v) => v.toFixed(3)).join(", ")}]`;
}

// --- the answer --------------------------------------------------------------

function highlight(index, on) {
  for (const el of document.querySelectorAll(`[data-entity="${index}"]`)) {
    el.classList.toggle("hl", on);
  }
}

function linked(el, index) {
  el.dataset.entity = index;
  el.addEventListener("mouseenter", () => highlight(index, true));
  el.addEventListener("mouseleave", () => highlight(index, false));
  return el;
}

function showResult(result) {
  state.result = result;
  for (const el of overlay.querySelectorAll(".entity")) el.remove();
  $("result").hidden = !result;
  if (!result) return;
  result.entities.forEach((entity, i) => {
    const color = COLORS[i % COLORS.length];
    for (const box of entity.boxes) {
      const div = linked(document.createElement("div"), i);
      div.className = "box entity";
      div.style.borderColor = color;
      place(div, box);
      const label = document.createElement("span");
      label.className = "label";
      label.style.background = color;
      label.textContent = entity.phrase;
      div.appendChild(label);
      overlay.appendChild(div);
    }
  });
  // The text with each grounded phrase coloured like its boxes (spans index the text).
  const answer = $("answer");
  answer.textContent = "";
  const spans = result.entities.map((e, i) => [e.span[0], e.span[1], i])
    .filter(([start, end]) => end > start).sort((a, b) => a[0] - b[0]);
  let pos = 0;
  for (const [start, end, i] of spans) {
    if (start < pos) continue; // overlapping phrases: the first one wins
    answer.append(result.text.slice(pos, start));
    const span = linked(document.createElement("span"), i);
    span.className = "phrase";
    span.style.borderColor = COLORS[i % COLORS.length];
    span.style.background = `${COLORS[i % COLORS.length]}22`;
    span.textContent = result.text.slice(start, end);
    answer.append(span);
    pos = end;
  }
  answer.append(result.text.slice(pos));
  const t = result.timings;
  $("timings").textContent = `batch of ${t.batch_size} · queue ${t.queue_ms} ms · ` +
    `generate ${t.generate_ms} ms · total ${t.total_ms} ms`;
  $("json").textContent = JSON.stringify(result, null, 2);
  $("copied").textContent = "";
}

$("copy").addEventListener("click", async () => {
  const text = JSON.stringify(state.result, null, 2);
  try {
    await navigator.clipboard.writeText(text);
  } catch (err) { // no clipboard permission: copy through a selection
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copied").textContent = "Copied.";
});

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!state.image) return showError("Choose a picture first.");
  if ($("task").value === "reg" && !state.box) return showError("Draw a box on the picture first.");
  showError(null);
  $("run").disabled = true;
  $("run").textContent = "Running…";
  try {
    const response = await fetch("/v1/generate", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()) });
    const data = await response.json();
    if (!response.ok) throw new Error(`${response.status}: ${data.error}`);
    showResult(data);
  } catch (err) {
    showResult(null);
    showError(err.message);
  } finally {
    $("run").disabled = false;
    $("run").textContent = "Run";
  }
});

async function init() {
  showTaskFields();
  try {
    const health = await (await fetch("/healthz")).json();
    for (const name of [...OPTIONS, "do_sample"]) {
      if (name === "do_sample") $(name).checked = false;
      else $(name).placeholder = `${health.defaults[name]} (default)`;
    }
    $("status").textContent = `ready · ${health.image_size} px pictures · ` +
      `batches of up to ${health.max_batch}`;
    await loadExamples();
  } catch (err) {
    $("status").textContent = `server unreachable: ${err.message}`;
  }
}
init();
