// The page of `vqgan serve`: plain JS, no build step. URLs are relative so the page also works behind
// a path prefix. The API key lives in sessionStorage (this tab) and goes out as `Authorization: Bearer`.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "vqgan-api-key";

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(id, message) {
  const box = $(id);
  box.textContent = message;
  box.hidden = !message;
}

// A non-2xx response -> one readable line: FastAPI's `detail` is a string or a list of {loc, msg}.
async function serverError(response) {
  const text = await response.text();
  let detail = text || response.statusText;
  try {
    detail = JSON.parse(text).detail ?? detail;
  } catch { /* not JSON: show the text as it is */ }
  if (Array.isArray(detail)) {
    detail = detail.map((e) => `${(e.loc || []).filter((part) => part !== "body").join(".")}: ${e.msg}`).join("\n");
  } else if (typeof detail !== "string") {
    detail = JSON.stringify(detail);
  }
  const retry = response.headers.get("Retry-After");
  return `Error ${response.status}: ${detail}${retry ? ` (retry in ${retry} s)` : ""}`;
}

async function request(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error(`Could not reach the server (${e.message})`);
  }
  if (!response.ok) throw new Error(await serverError(response));
  return response;
}

function numberField(id) {
  const value = $(id).valueAsNumber;
  return Number.isFinite(value) ? value : null;
}

// The sampling options shared by generation and editing; class is a name or an id, null = none.
function sampling() {
  const options = { class: $("class").value || null, temperature: numberField("temperature") ?? 1 };
  if (options.class !== null) options.cfg = numberField("cfg") ?? 1;  // guidance needs a class
  const topK = numberField("top-k");
  if (topK !== null) options.top_k = topK;
  const decodeSteps = numberField("decode-steps");
  if (decodeSteps !== null && !$("decode-steps").hidden) options.decode_steps = decodeSteps;
  const seed = numberField("seed");
  if (seed !== null) options.seed = seed;
  return options;
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0] % 2 ** 31;
}

// ---- the model ------------------------------------------------------------------------------------
async function loadModels() {
  showError("models-error", "");
  try {
    const info = await (await request("v1/models", { headers: authHeaders() })).json();
    const { num_classes: count, class_names: names } = info.prior;
    const select = $("class");
    select.replaceChildren();
    for (let i = 0; i < count; i++) select.add(new Option(names ? names[i] : `class ${i}`, names ? names[i] : i));
    select.add(new Option(count ? "unconditional (no class)" : "unconditional", ""));
    $("cfg").disabled = count === 0;
    if (count === 0) $("cfg").value = 1;
    const masked = info.prior.config.config.prior_type === "masked";  // parallel decoding: steps apply
    for (const element of document.querySelectorAll(".masked-only")) element.hidden = !masked;
    const [h, w] = info.tokenizer.code_shape;
    $("model-info").textContent = `${info.image_size} px images from ${h}×${w} codes; ` +
      (count ? `${count} classes` : "unconditional") +
      (masked ? ", masked prior (parallel decoding)." : ", autoregressive prior.");
  } catch (e) {
    $("model-info").textContent = "";
    showError("models-error", `${e.message}${e.message.includes("401") ? " — enter the API key above." : ""}`);
  }
}

// ---- generation: server-sent events over fetch (EventSource cannot POST) -------------------------
function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;  // comments keep a connection alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { type, data: JSON.parse(data.join("\n")) } : null;
}

async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = /\r?\n\r?\n/.exec(buffer))) {  // a blank line ends an event
      const event = parseEvent(buffer.slice(0, end.index));
      buffer = buffer.slice(end.index + end[0].length);
      if (event) yield event;
    }
  }
}

async function generate() {
  const button = $("generate"), picture = $("generated"), status = $("generate-status");
  button.disabled = true;
  showError("generate-error", "");
  $("generate-timings").textContent = "";
  picture.dataset.state = "waiting";
  picture.dataset.partials = "0";
  status.value = "Queued…";
  try {
    const response = await request("v1/generate/stream", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ ...sampling(), every_rows: 1 }),
    });
    let final = null;
    for await (const { type, data } of serverEvents(response)) {
      if (type === "error") throw new Error(`Error: ${data.detail}`);
      picture.src = `data:image/png;base64,${data.png}`;
      picture.hidden = false;
      if (type === "partial") {
        picture.dataset.state = "partial";
        picture.dataset.partials = String(Number(picture.dataset.partials) + 1);
        status.value = data.step !== undefined ? `Decoding step ${data.step} of ${data.of}`
                                               : `Code rows ${data.rows} of ${data.of}`;
      } else if (type === "final") {
        final = data;
        break;
      }
    }
    if (!final) throw new Error("The stream ended before the final image.");
    await picture.decode().catch(() => {});
    picture.dataset.state = "final";
    picture.alt = `Generated image, seed ${final.seed}`;
    status.value = `Done (${picture.dataset.partials} partial images)`;
    const first = final.time_to_first_partial_ms;
    $("generate-timings").textContent = `Seed ${final.seed} · first partial image: ` +
      `${first === null ? "none" : `${first} ms`} · total: ${final.total_ms} ms (measured by the server)`;
  } catch (e) {
    picture.dataset.state = "error";
    status.value = "";
    showError("generate-error", e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- reconstruct and edit -------------------------------------------------------------------------
let upload = null;   // the chosen File, sent as it is
let resultUrl = null;

async function openImage(file) {
  showError("edit-error", "");
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showError("edit-error", `The browser could not read ${file.name} as an image.`);
    return;
  }
  upload = file;
  // the mask has the image's own pixel size: the server crops it exactly as it crops the image
  for (const canvas of [$("photo"), $("mask")]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  $("photo").getContext("2d").drawImage(bitmap, 0, 0);
  $("photo").setAttribute("aria-label", `The uploaded image, ${file.name}, ${bitmap.width}×${bitmap.height} px`);
  bitmap.close();
  $("editor").hidden = false;
}

function setUpMaskDrawing() {
  const mask = $("mask");
  let last = null;
  const point = (e) => {
    const box = mask.getBoundingClientRect();
    return [(e.clientX - box.left) * mask.width / box.width, (e.clientY - box.top) * mask.height / box.height];
  };
  const paint = (from, to) => {
    const ctx = mask.getContext("2d");
    const width = Math.max(1, $("brush").valueAsNumber / 100 * mask.width);
    ctx.strokeStyle = ctx.fillStyle = "#ff00ff";
    ctx.lineWidth = width;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from[0] === to[0] && from[1] === to[1]) {  // a tap: canvas skips zero-length lines, so draw a dot
      ctx.arc(to[0], to[1], width / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
    }
  };
  // pointer events cover the mouse, pens and touch; touch-action: none (CSS) stops scrolling while drawing
  mask.addEventListener("pointerdown", (e) => {
    mask.setPointerCapture(e.pointerId);
    last = point(e);
    paint(last, last);
  });
  mask.addEventListener("pointermove", (e) => {
    if (!last) return;
    const next = point(e);
    paint(last, next);
    last = next;
  });
  for (const type of ["pointerup", "pointercancel"]) mask.addEventListener(type, () => { last = null; });
  $("clear-mask").addEventListener("click", () => mask.getContext("2d").clearRect(0, 0, mask.width, mask.height));
}

// The drawn strokes -> a PNG of the image's size, white = edit, black = keep; null when nothing is drawn.
function maskPng() {
  const mask = $("mask");
  const strokes = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const pixels = strokes.data;
  let drawn = false;
  for (let i = 0; i < pixels.length; i += 4) {
    const value = pixels[i + 3] >= 128 ? 255 : 0;
    drawn ||= value > 0;
    pixels[i] = pixels[i + 1] = pixels[i + 2] = value;
    pixels[i + 3] = 255;
  }
  if (!drawn) return Promise.resolve(null);
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  out.getContext("2d").putImageData(strokes, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function runEdit() {
  const button = $("run-edit"), status = $("edit-status"), operation = $("operation").value;
  button.disabled = true;
  showError("edit-error", "");
  status.value = "Working…";
  try {
    const form = new FormData();
    form.append("image", upload, upload.name);
    let url = "v1/reconstruct";
    if (operation !== "reconstruct") {
      url = "v1/edit";
      const options = sampling();
      options.seed ??= randomSeed();
      form.append("operation", operation);
      for (const [name, value] of Object.entries(options)) if (value !== null) form.append(name, String(value));
      const mask = await maskPng();
      if (mask) form.append("mask", mask, "mask.png");
    }
    const response = await request(url, { method: "POST", headers: authHeaders(), body: form });
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(await response.blob());
    const result = $("edited");
    result.src = resultUrl;
    result.hidden = false;
    const seed = response.headers.get("X-Seed");
    result.alt = `Result of ${operation}${seed ? `, seed ${seed}` : ""}`;
    status.value = `Done${seed ? ` (seed ${seed})` : ""}`;
  } catch (e) {
    status.value = "";
    showError("edit-error", e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- wiring ---------------------------------------------------------------------------------------
function setUp() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORE, key.value));
  key.addEventListener("change", loadModels);
  $("options").addEventListener("submit", (e) => e.preventDefault());
  $("random-seed").addEventListener("click", () => { $("seed").value = randomSeed(); });
  $("generate").addEventListener("click", generate);
  $("upload").addEventListener("change", () => $("upload").files[0] && openImage($("upload").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) openImage(e.dataTransfer.files[0]);
  });
  setUpMaskDrawing();
  $("run-edit").addEventListener("click", runEdit);
  loadModels();
}

setUp();
