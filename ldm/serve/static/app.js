// The generation page: a form for POST /v1/generate/stream, the streamed progress and previews, and a gallery
// of this session's images (each a PNG from the server, with its settings inside, to download or to start
// an image-to-image run from). Plain JavaScript, nothing loaded from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "guidance_scale", "num_inference_steps", "sampler",
  "num_images_per_prompt", "width", "height", "seed", "strength"];
const KEY_STORE = "ldm-api-key";  // sessionStorage: the key lasts as long as the tab
let running = null;  // the AbortController of the request being run
let initImage = null;  // base64 PNG of the image-to-image start, or null

// fetch() with the API key as a Bearer header; a 401 asks the user for the key and sends the request again.
async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = { ...options.headers, ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const { error } = await response.json();
    sessionStorage.setItem(KEY_STORE, await askForKey(error.message));
  }
}

// Shows the key form with the server's message; resolves with the key the user submits.
function askForKey(message) {
  $("key-error").textContent = message;
  $("key-form").hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
  return new Promise((resolve) => {
    $("key-form").addEventListener("submit", (submit) => {
      submit.preventDefault();
      $("key-form").hidden = true;
      resolve($("api-key").value.trim());
    }, { once: true });
  });
}

async function describeModel() {
  const model = await (await api("/v1/model")).json();
  $("model-name").textContent = `${model.name} · ${model.device} · ${model.dtype}`;
  $("guidance_scale").value = model.defaults.guidance_scale;
  $("num_inference_steps").value = model.defaults.num_inference_steps;
  $("num_inference_steps").max = model.limits.max_steps;
  $("num_images_per_prompt").max = model.limits.max_images;
  for (const name of model.samplers) $("sampler").add(new Option(name, name, false, name === model.defaults.sampler));
  for (const side of ["width", "height"]) {
    for (let px = model.size_multiple; px <= model.limits.max_side; px += model.size_multiple) {
      $(side).add(new Option(`${px}`, `${px}`, false, px === model.default_size));
    }
  }
  setRunning(false);  // the form is complete: Generate can send it
  setStatus("Ready.", 0);
}

function requestBody() {
  const body = { prompt: $("prompt").value, preview_every: 2 };
  const negative = $("negative_prompt").value;
  if (negative) body.negative_prompt = negative;
  for (const name of ["guidance_scale", "num_inference_steps", "num_images_per_prompt"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  body.sampler = $("sampler").value;
  if (!$("random-seed").checked && $("seed").value !== "") body.seed = Number($("seed").value);
  if (initImage) {
    body.image = initImage;
    body.strength = Number($("strength").value);
  } else {
    body.width = Number($("width").value);
    body.height = Number($("height").value);
  }
  return body;
}

// Server-sent events from a fetch body: yields {event, data} as they arrive.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(block)?.[1] ?? "message";
      const data = JSON.parse(/^data: (.*)$/m.exec(block)?.[1] ?? "{}");
      yield { event, data };
    }
  }
}

async function generate(submit) {
  submit.preventDefault();
  showError(null);
  const body = requestBody();
  running = new AbortController();
  setRunning(true);
  setStatus("Sending…", 0);
  let finished = false;  // a done, error or cancelled event arrived
  try {
    const response = await api("/v1/generate/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!response.ok) {
      const { error } = await response.json();
      showError(error, response.headers.get("Retry-After"));
      setStatus("Not started.", 0);
      return;
    }
    for await (const { event, data } of serverSentEvents(response)) {
      finished ||= ["done", "error", "cancelled"].includes(event);
      if (event === "queued") setStatus(`Queued (place ${data.position}).`, 0);
      else if (event === "started") setStatus("Sampling…", 0);
      else if (event === "progress") {
        setStatus(`Step ${data.step} of ${data.steps}.`, data.step / data.steps);
        if (data.previews) showPreview(data.previews, "denoising preview");
      } else if (event === "done") {
        showPreview(data.images.map((image) => image.png_base64), "generated image");
        // newest run first, its images in seed order
        $("gallery").prepend(...data.images.map((image) => galleryItem(image, data.settings)));
        const seeds = data.images.map((image) => image.seed).join(", ");
        setStatus(`Done in ${data.timings.sampling_s.toFixed(1)} s (seed ${seeds}).`, 1);
      } else if (event === "error") {
        showError(data.error);
        setStatus("Failed.", 0);
      } else if (event === "cancelled") {
        showError(data);
        setStatus("Cancelled.", 0);
      }
    }
    if (!finished) {
      showError({ message: "the server closed the stream before the images were done" });
      setStatus("Failed.", 0);
    }
  } catch (err) {
    if (err.name === "AbortError") setStatus("Cancelled.", 0);
    else showError({ message: `${err}` });
  } finally {
    running = null;
    setRunning(false);
  }
}

function setRunning(isRunning) {
  $("generate").disabled = isRunning;
  $("cancel").disabled = !isRunning;
}

function setStatus(text, fraction) {
  $("status").textContent = text;
  $("progress").value = fraction;
}

function showPreview(images, alt) {
  $("preview").replaceChildren(...images.map((data) => {
    const img = new Image();
    img.src = `data:image/png;base64,${data}`;
    img.alt = alt;
    return img;
  }));
}

function showError(error, retryAfter) {
  for (const name of FIELDS) $(name)?.classList.remove("invalid");
  $("error").hidden = !error;
  if (!error) return;
  $("error").textContent = error.message + (retryAfter ? ` (retry in ${retryAfter} s)` : "");
  if (error.field) $(error.field)?.classList.add("invalid");
}

function pngBlob(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function galleryItem(image, settings) {
  const url = URL.createObjectURL(pngBlob(image.png_base64));
  const item = document.createElement("figure");
  item.className = "item";
  const img = new Image();
  img.src = url;
  img.alt = settings.prompt;
  const caption = document.createElement("figcaption");
  caption.textContent = `${settings.prompt || "(unconditional)"} · seed ${image.seed}`;
  const download = document.createElement("a");
  download.href = url;
  download.download = `ldm-${image.seed}.png`;
  download.textContent = "Download";
  download.className = "download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Use as start";
  reuse.className = "reuse";
  reuse.addEventListener("click", () => useAsStart(image.png_base64, settings));
  item.append(img, caption, download, reuse);
  return item;
}

function useAsStart(base64, settings) {
  initImage = base64;
  $("init-preview").src = `data:image/png;base64,${base64}`;
  $("init-image").hidden = false;
  $("width").disabled = $("height").disabled = true;  // the start image sets the size
  $("prompt").value = settings.prompt;
  $("prompt").focus();
}

function clearInitImage() {
  initImage = null;
  $("init-image").hidden = true;
  $("width").disabled = $("height").disabled = false;
}

window.addEventListener("DOMContentLoaded", () => {
  describeModel().catch((err) => {
    showError({ message: `cannot read /v1/model: ${err}` });
    setStatus("Not ready.", 0);
  });
  $("settings").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => running?.abort());
  $("random-seed").addEventListener("change", () => { $("seed").disabled = $("random-seed").checked; });
  $("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
  $("clear-init").addEventListener("click", clearInitImage);
});
