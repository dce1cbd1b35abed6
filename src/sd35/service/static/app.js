// sd35 page: a plain client of the service's public API (no framework, no build step, no CDN).
//   1. /page/config.json (open) says whether to ask for an API key; the key lives in sessionStorage.
//   2. GET /v1/models → /v1/models/{id} gives the model's size presets, defaults and limits.
//   3. Generate = POST /v1/images/generations {stream: true, partial_images}: Server-Sent Events read
//      from fetch's ReadableStream (EventSource cannot POST), previews first, then the final images.
//   4. Every result goes to this tab's gallery with its parameters, a download link and copyable
//      curl / Python (openai) snippets that reproduce it.
"use strict";

const KEY_STORE = "sd35.apiKey";
const GALLERY_STORE = "sd35.gallery";
const MAX_SEED = 4294967295; // random seeds the page picks stay in uint32 (any 0..2^63-1 is accepted)
const $ = (id) => document.getElementById(id);

const state = {
  authRequired: false,
  model: null, // the served model id
  card: null, // sd35's model card: sizes, defaults, limits
  lastSeed: null,
  busy: false,
  abort: null,
  gallery: [], // [{id, params, images: [dataURL], seeds, created, seconds}]
  retryTimer: null,
};

// --- API -------------------------------------------------------------------------------------------------

function headers(json) {
  const h = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const e = (body && body.error) || {};
    super(e.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
    this.retryAfter = retryAfter;
  }
}

async function apiError(resp) {
  let body = null;
  const text = await resp.text();
  try { body = JSON.parse(text); } catch (_) { body = text.slice(0, 500); }
  const ra = resp.headers.get("Retry-After");
  return new ApiError(resp.status, body, ra === null ? null : Number(ra));
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(false) });
  if (!resp.ok) throw await apiError(resp);
  return resp.json();
}

// Server-Sent Events from a fetch body: "event: NAME\ndata: JSON\n\n" blocks, in order.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
    if (done) return;
  }
}

// --- status, errors ------------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  clearInterval(state.retryTimer);
  box.classList.remove("busy");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  if (!(err instanceof ApiError)) {
    box.textContent = "Could not reach the service: " + (err.message || err);
    return;
  }
  const where = err.param ? ` (${err.param})` : "";
  box.textContent = `${err.status}${where}: ${err.message}`;
  if (err.status === 401) {
    $("key-row").hidden = false;
    $("key").focus();
  }
  if (err.retryAfter !== null && (err.status === 429 || err.status === 503)) {
    box.classList.add("busy");
    let left = err.retryAfter;
    const tick = () => {
      box.textContent = `${err.status}: ${err.message}\nBusy — Retry-After: ${err.retryAfter} s` +
        (left > 0 ? ` (try again in ${left} s)` : " — you can try again now.");
      left -= 1;
      if (left < 0) clearInterval(state.retryTimer);
    };
    tick();
    state.retryTimer = setInterval(tick, 1000);
    refreshQueue();
  }
}

async function refreshQueue() {
  try {
    const r = await fetch("/readyz", { headers: headers(false) });
    const body = await r.json().catch(() => ({}));
    if (r.status === 401) { $("queue").textContent = "API key needed"; return; }
    if (!r.ok) { $("queue").textContent = `model ${body.status || "not ready"}…`; return; }
    const waiting = body.queue_depth || 0;
    const model = body.waking_up ? " · model waking up…" : body.loaded === false ? " · model asleep (the next request wakes it)" : "";
    $("queue").textContent = `${body.device && body.device.name ? body.device.name + " · " : ""}` +
      `queue: ${waiting} waiting (room for ${body.queue_size})${model}${state.busy ? " · yours is running or queued" : ""}`;
  } catch (_) {
    $("queue").textContent = "service unreachable";
  }
}

// Where this tab's job stands (GET /v1/queue: position 1 runs next, estimates from the measured speed).
async function followJob(jobId, hasPreviews) {
  let q;
  try { q = await getJSON("/v1/queue"); } catch (_) { return; }
  const job = (q.data || []).find((j) => j.id === jobId);
  $("cancel").hidden = !job || job.state !== "queued";
  if (!job || hasPreviews()) return;
  if (job.state === "queued") {
    const others = q.others && q.others.queued ? ` (${q.others.queued} from others waiting)` : "";
    $("live-status").textContent = `— position ${job.position}, about ${Math.max(1, Math.round(job.estimated_start_s))} s${others}`;
  } else if (q.waking_up || q.loaded === false) {
    $("live-status").textContent = "— waking up the model (it was released while idle)…";
  } else {
    $("live-status").textContent = `— running, about ${Math.max(1, Math.round(job.estimated_end_s))} s left`;
  }
}

async function cancelQueued() {
  if (!state.jobId) return;
  const resp = await fetch(`/v1/queue/${encodeURIComponent(state.jobId)}`, { method: "DELETE", headers: headers(false) });
  if (!resp.ok) showError(await apiError(resp));
  $("cancel").hidden = true;
}

// --- the form --------------------------------------------------------------------------------------------

function fillForm(card) {
  const size = $("size");
  size.replaceChildren();
  const sizes = card.sizes || [];
  sizes.forEach((s, i) => {
    const [w, h] = s.split("x").map(Number);
    const o = document.createElement("option");
    o.value = s;
    o.textContent = `${w} × ${h}${i === 0 ? " (default)" : ""}`;
    o.title = w === h ? "square" : w > h ? "landscape" : "portrait";
    size.append(o);
  });
  const d = card.defaults || {};
  if (d.size && sizes.includes(d.size)) size.value = d.size;
  $("steps").placeholder = d.steps ? `${d.steps} (default)` : "default";
  $("steps").max = card.max_steps;
  $("guidance").placeholder = d.guidance_scale !== undefined ? `${d.guidance_scale} (default)` : "default";
  $("n").max = card.max_n;
}

async function connect() {
  showError(null);
  try {
    const list = await getJSON("/v1/models");
    state.model = list.data[0].id;
    $("model").textContent = "· " + state.model;
    const model = await getJSON("/v1/models/" + encodeURIComponent(state.model));
    state.card = model.sd35;
    if (!state.card || !state.card.ready) {
      $("queue").textContent = `model ${state.card ? state.card.state : "not ready"}… (checking again in 3 s)`;
      setTimeout(connect, 3000);
      return;
    }
    fillForm(state.card);
    loadLoras();
    $("generate").disabled = false;
    refreshQueue();
  } catch (err) {
    $("queue").textContent = err.status === 401 ? "API key needed" : "not connected";
    showError(err);
  }
}

function readNumber(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  return Number.isFinite(v) ? v : raw; // a non-number goes to the API as typed; its 400 says why
}

function requestBody() {
  let seed = readNumber("seed");
  if (seed === undefined) seed = Math.floor(Math.random() * (MAX_SEED + 1));
  const body = {
    model: state.model,
    prompt: $("prompt").value,
    size: $("size").value || undefined,
    n: readNumber("n") ?? 1,
    seed,
  };
  const negative = $("negative").value;
  if (negative.trim()) body.negative_prompt = negative;
  const steps = readNumber("steps");
  if (steps !== undefined) body.steps = steps;
  const guidance = readNumber("guidance");
  if (guidance !== undefined) body.guidance_scale = guidance;
  const lora = pickedLoras();
  if (lora !== undefined) body.lora = lora;
  return body;
}

// --- the LoRA picker (GET /v1/loras; a request's `lora: [{name, scale}]`) ----------------------------------

async function loadLoras() {
  let list = [];
  try { list = (await getJSON("/v1/loras")).data || []; } catch (_) { list = []; }
  const box = $("loras");
  box.replaceChildren();
  list.forEach((l) => {
    const id = "lora-" + l.name.replace(/[^A-Za-z0-9_-]/g, "_");
    const check = el("input", { type: "checkbox", id, disabled: !l.usable });
    check.dataset.lora = l.name;
    const scale = el("input", { type: "range", min: "-2", max: "2", step: "0.05", value: "1" });
    scale.setAttribute("aria-label", `${l.name} scale`);
    const shown = el("output", { textContent: "1.00" });
    scale.addEventListener("input", () => { shown.textContent = Number(scale.value).toFixed(2); });
    const label = el("label", { htmlFor: id, textContent: `${l.name} `,
                                title: l.usable ? `sha256 ${l.sha256}` : l.error });
    label.append(el("small", { className: "muted",
                               textContent: l.usable ? `rank ${l.rank} · ${l.layers} layers` : "does not fit this model" }));
    box.append(el("div", { className: "row lora" }, check, label, scale, shown));
  });
  $("lora-field").hidden = list.length === 0;
}

function loraText(lora) {
  return lora && lora.length ? lora.map((l) => `${l.name} ×${l.scale}`).join(", ") : undefined;
}

function pickedLoras() {
  if ($("lora-field").hidden) return undefined; // no LoRA folder: the field is not sent
  if (window.sd35Edit && window.sd35Edit.active()) return undefined; // /v1/images/edits takes no `lora` (yet)
  return [...$("loras").querySelectorAll("input[type=checkbox]:checked")].map((c) => ({
    name: c.dataset.lora,
    scale: Number(c.closest(".lora").querySelector("input[type=range]").value),
  }));
}

// --- generate ----------------------------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("stop").hidden = !busy;
  $("generate").textContent = busy ? "Generating…" : "Generate";
}

function imageElement(src, alt) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  img.decoding = "async";
  return img;
}

async function generate() {
  if (state.busy) return;
  if (!state.card) { await connect(); if (!state.card) return; }
  showError(null);
  const editing = window.sd35Edit && window.sd35Edit.active(); // Edit mode (edit.js): POST /v1/images/edits
  if (window.sd35Edit && window.sd35Edit.wanted()) {
    showError(new Error("choose an image to edit first (or switch back to Generate)"));
    return;
  }
  const params = requestBody();
  if (editing) params.edit = { strength: window.sd35Edit.strength(), mask: window.sd35Edit.masked() };
  const partials = Math.min(state.card.max_partial_images || 3, 3);
  const started = performance.now();
  setBusy(true);
  $("live").hidden = false;
  $("live-images").replaceChildren();
  $("partials").replaceChildren();
  $("live-status").textContent = "— waiting for the GPU…";
  const controller = new AbortController();
  state.abort = controller;
  const jobId = "page-" + Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
  state.jobId = jobId;
  let previews = 0;
  const poll = setInterval(() => { refreshQueue(); followJob(jobId, () => previews > 0); }, 1000);
  refreshQueue();
  const finals = [];
  try {
    const fields = { ...params, stream: true, partial_images: partials, response_format: "b64_json" };
    delete fields.edit;
    const resp = editing ? await window.sd35Edit.send(fields, controller.signal, { ...headers(false), "X-Request-Id": jobId })
      : await fetch("/v1/images/generations", {
        method: "POST",
        headers: { ...headers(true), Accept: "text/event-stream", "X-Request-Id": jobId },
        body: JSON.stringify(fields),
        signal: controller.signal,
      });
    if (!resp.ok) throw await apiError(resp);
    for await (const ev of sseEvents(resp)) {
      if (ev.name === "image_generation.partial_image" || ev.name === "image_edit.partial_image") {
        previews += 1;
        const src = `data:image/${ev.data.output_format || "png"};base64,${ev.data.b64_json}`;
        $("live-images").replaceChildren(imageElement(src, `preview ${ev.data.partial_image_index + 1}`));
        const fig = document.createElement("figure");
        const cap = document.createElement("figcaption");
        cap.textContent = `preview ${ev.data.partial_image_index + 1}`;
        fig.append(imageElement(src, cap.textContent), cap);
        $("partials").append(fig);
        $("live-status").textContent = `— preview ${previews} of up to ${partials}`;
      } else if (ev.name === "image_generation.completed" || ev.name === "image_edit.completed") {
        const src = `data:image/${ev.data.output_format || "png"};base64,${ev.data.b64_json}`;
        finals.push(src);
        if (finals.length === 1) $("live-images").replaceChildren();
        $("live-images").append(imageElement(src, `image ${finals.length}`));
        $("live-status").textContent = `— image ${finals.length} of ${params.n}`;
      } else if (ev.name === "error") {
        const code = ev.data.error && ev.data.error.code;
        const status = { timeout: 504, out_of_memory: 503, shutting_down: 503, invalid_value: 400 }[code] || 500;
        throw new ApiError(status, ev.data, null);
      }
    }
    if (!finals.length) throw new Error("the stream ended without an image");
    const seconds = (performance.now() - started) / 1000;
    state.lastSeed = params.seed;
    $("seed-last").disabled = false;
    addEntry({ id: Date.now(), params, images: finals, previews, created: new Date().toISOString(), seconds });
    $("live").hidden = true;
  } catch (err) {
    if (err.name === "AbortError") {
      showError(null);
      $("live-status").textContent = "— stopped";
    } else if (err.code === "cancelled") {
      showError(null);
      $("live-status").textContent = "— cancelled while queued";
    } else {
      showError(err);
      $("live").hidden = finals.length === 0;
    }
  } finally {
    clearInterval(poll);
    state.abort = null;
    state.jobId = null;
    $("cancel").hidden = true;
    setBusy(false);
    refreshQueue();
  }
}

// --- gallery -----------------------------------------------------------------------------------------------

function seedsOf(entry) {
  return entry.images.map((_, i) => entry.params.seed + i); // the service: image i uses seed + i
}

function curlSnippet(params) {
  if (params.edit) return editCurlSnippet(params);
  const url = location.origin + "/v1/images/generations";
  const json = JSON.stringify(params, null, 2).replace(/'/g, "'\\''");
  const auth = state.authRequired ? ` \\\n  -H "Authorization: Bearer $SD35_API_KEY"` : "";
  return `curl -sS ${url}${auth} \\\n  -H "Content-Type: application/json" \\\n  -d '${json}' \\\n` +
    `  | python3 -c 'import base64, json, sys\nfor i, d in enumerate(json.load(sys.stdin)["data"]):\n` +
    `    open(f"image-{i}.png", "wb").write(base64.b64decode(d["b64_json"]))'`;
}

function pythonSnippet(params) {
  if (params.edit) return editPythonSnippet(params);
  // a JSON string is a Python str; the `lora` list ([{name: str, scale: number}]) is a Python literal as JSON
  const py = (v) => (typeof v === "string" || typeof v === "object" ? JSON.stringify(v) : String(v));
  const std = ["model", "prompt", "size", "n"].filter((k) => params[k] !== undefined);
  const extra = ["negative_prompt", "steps", "guidance_scale", "seed", "lora"].filter((k) => params[k] !== undefined);
  const key = state.authRequired ? 'os.environ["SD35_API_KEY"]' : '"unused"';
  const lines = [
    "import base64",
    ...(state.authRequired ? ["import os"] : []),
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(location.origin + "/v1")}, api_key=${key})`,
    "result = client.images.generate(",
    ...std.map((k) => `    ${k}=${py(params[k])},`),
    ...(extra.length ? [`    extra_body={${extra.map((k) => `${py(k)}: ${py(params[k])}`).join(", ")}},`] : []),
    ")",
    "for i, image in enumerate(result.data):",
    '    with open(f"image-{i}.png", "wb") as f:',
    "        f.write(base64.b64decode(image.b64_json))",
  ];
  return lines.join("\n");
}

// An edit's snippets: the input saved as input.png (and the painted mask as mask.png) beside them.
function editFields(params) {
  const f = { prompt: params.prompt, n: params.n, size: "auto", seed: params.seed, strength: params.edit.strength };
  for (const k of ["negative_prompt", "steps", "guidance_scale"]) if (params[k] !== undefined) f[k] = params[k];
  return f;
}

function editCurlSnippet(params) {
  const auth = state.authRequired ? ` \\\n  -H "Authorization: Bearer $SD35_API_KEY"` : "";
  const form = Object.entries(editFields(params))
    .map(([k, v]) => ` \\\n  -F '${k}=${String(v).replace(/'/g, "'\\''")}'`).join("");
  return `curl -sS ${location.origin}/v1/images/edits${auth} \\\n  -F image=@input.png` +
    (params.edit.mask ? ` \\\n  -F mask=@mask.png` : "") + form;
}

function editPythonSnippet(params) {
  const py = (v) => (typeof v === "string" ? JSON.stringify(v) : String(v));
  const { prompt, n, size, ...extra } = editFields(params);
  const key = state.authRequired ? 'os.environ["SD35_API_KEY"]' : '"unused"';
  return [
    ...(state.authRequired ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(location.origin + "/v1")}, api_key=${key})`,
    "result = client.images.edit(",
    '    image=open("input.png", "rb"),',
    ...(params.edit.mask ? ['    mask=open("mask.png", "rb"),  # transparent = repaint'] : []),
    `    prompt=${py(prompt)}, n=${n}, size=${py(size)},`,
    `    extra_body={${Object.entries(extra).map(([k, v]) => `${py(k)}: ${py(v)}`).join(", ")}},`,
    ")",
  ].join("\n");
}

async function copyText(text, button) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch (_) { /* fall back below */ }
  if (!ok) { // plain http on a LAN address is not a secure context: the old way still works
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
  }
  const label = button.textContent;
  button.textContent = ok ? "Copied" : "Select it below";
  setTimeout(() => { button.textContent = label; }, 1500);
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  node.append(...children);
  return node;
}

function renderEntry(entry) {
  const p = entry.params;
  const seeds = seedsOf(entry);
  const figures = entry.images.map((src, i) => {
    const ext = (src.match(/^data:image\/(\w+)/) || [, "png"])[1];
    const link = el("a", { href: src, download: `sd35-${seeds[i]}.${ext}`, textContent: "Download" });
    const editThis = el("button", { type: "button", className: "link", textContent: "Edit this" });
    editThis.addEventListener("click", () => window.sd35Edit && window.sd35Edit.load(src));
    return el("figure", {}, imageElement(src, `${p.prompt} (seed ${seeds[i]})`),
      el("figcaption", {}, el("span", { className: "muted", textContent: `seed ${seeds[i]}` }), link, editThis));
  });
  const params = el("dl", { className: "params" });
  const facts = [["Prompt", p.prompt], ["Negative prompt", p.negative_prompt], ["Size", p.size],
    ["Steps", p.steps ?? `${state.card?.defaults?.steps ?? "default"} (default)`],
    ["Guidance", p.guidance_scale ?? `${state.card?.defaults?.guidance_scale ?? "default"} (default)`],
    ["Seed", p.seed], ["n", p.n], ["LoRAs", loraText(p.lora)], ["Time", `${entry.seconds.toFixed(1)} s`],
    ["Edit", p.edit && `${p.edit.mask ? "inpaint" : "img2img"}, strength ${p.edit.strength}`]];
  for (const [k, v] of facts) {
    if (v === undefined || v === null || v === "") continue;
    params.append(el("div", {}, el("dt", { textContent: k }), el("dd", { textContent: String(v) })));
  }
  const curl = curlSnippet(p);
  const python = pythonSnippet(p);
  const curlBtn = el("button", { type: "button", className: "secondary", textContent: "Copy as curl" });
  const pyBtn = el("button", { type: "button", className: "secondary", textContent: "Copy as Python (openai)" });
  const reuse = el("button", { type: "button", className: "secondary", textContent: "Reuse settings" });
  curlBtn.addEventListener("click", () => copyText(curl, curlBtn));
  pyBtn.addEventListener("click", () => copyText(python, pyBtn));
  reuse.addEventListener("click", () => reuseSettings(p));
  const snippets = el("details", {}, el("summary", { textContent: "Show the code" }),
    el("pre", { className: "curl", textContent: curl }), el("pre", { className: "python", textContent: python }));
  return el("article", { className: "entry" }, el("div", { className: "images" }, ...figures), params,
    el("div", { className: "copy" }, curlBtn, pyBtn, reuse), snippets);
}

function reuseSettings(p) {
  $("prompt").value = p.prompt;
  $("negative").value = p.negative_prompt || "";
  if ([...$("size").options].some((o) => o.value === p.size)) $("size").value = p.size;
  $("steps").value = p.steps ?? "";
  $("guidance").value = p.guidance_scale ?? "";
  $("n").value = p.n;
  $("seed").value = p.seed;
  $("prompt").focus();
}

function renderGallery() {
  $("gallery").replaceChildren(...state.gallery.map(renderEntry));
  $("empty").hidden = state.gallery.length > 0;
  $("clear").hidden = state.gallery.length === 0;
}

function saveGallery() {
  // Best effort: sessionStorage holds a few MB; the oldest results are dropped from storage (not from the
  // page) until the rest fits.
  for (let keep = state.gallery.length; keep >= 0; keep--) {
    try {
      sessionStorage.setItem(GALLERY_STORE, JSON.stringify(state.gallery.slice(0, keep)));
      return;
    } catch (_) { /* quota: try with fewer */ }
  }
}

function addEntry(entry) {
  state.gallery.unshift(entry);
  saveGallery();
  renderGallery();
}

// --- start ---------------------------------------------------------------------------------------------------

async function start() {
  $("generate").disabled = true;
  try {
    state.gallery = JSON.parse(sessionStorage.getItem(GALLERY_STORE) || "[]");
  } catch (_) { state.gallery = []; }
  renderGallery();
  if (state.gallery.length) {
    state.lastSeed = state.gallery[0].params.seed;
    $("seed-last").disabled = false;
  }
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) $("key").value = key;
  try {
    const config = await (await fetch("/page/config.json")).json();
    state.authRequired = !!config.auth_required;
  } catch (_) { /* an older service: the 401 of the first call shows the key field */ }
  $("key-row").hidden = !state.authRequired;
  if (state.authRequired && !key) {
    $("queue").textContent = "API key needed";
    $("key").focus();
    return;
  }
  connect();
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
$("form").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    if (e.target === $("key")) saveKey(); else generate();
  }
});
function saveKey() {
  clearTimeout(keyTimer);
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  state.card = null;
  connect();
}
$("key-save").addEventListener("click", saveKey);
// A key pasted or typed works at once: no Enter or "Use key" needed (connect once the typing pauses).
let keyTimer = null;
$("key").addEventListener("input", () => {
  clearTimeout(keyTimer);
  keyTimer = setTimeout(() => { if ($("key").value.trim()) saveKey(); }, 250);
});
$("key").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) { e.preventDefault(); saveKey(); }
});
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("cancel").addEventListener("click", cancelQueued);
$("seed-random").addEventListener("click", () => { $("seed").value = ""; });
$("seed-last").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
$("clear").addEventListener("click", () => {
  state.gallery = [];
  sessionStorage.removeItem(GALLERY_STORE);
  renderGallery();
});
start();
