// sd35 page, Edit mode: an image (uploaded, dropped, or "Edit this" on a result), a mask painted over it
// with a brush and an eraser (mouse, pen or touch: pointer events), a strength slider. app.js's Generate
// sends it through window.sd35Edit.send as OpenAI's POST /v1/images/edits (multipart, stream: true) and
// reads the image_edit.* events exactly like a generation's.
//   The mask is OpenAI's: a PNG, the image's size, transparent where painted (= repaint). Nothing painted
//   sends no mask: an img2img of the whole picture.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const edit = { loaded: false, drawing: false, last: null, name: "image.png" };

  function inEditMode() { return $("mode-edit").checked; }

  function showMode() {
    $("edit-panel").hidden = !inEditMode();
    $("size").disabled = inEditMode(); // an edit keeps its input's size ("auto")
  }

  async function load(src, name) {
    const img = new Image();
    img.src = src;
    await img.decode();
    for (const c of [$("edit-image"), $("edit-mask")]) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
    }
    $("edit-image").getContext("2d").drawImage(img, 0, 0);
    clearMask();
    edit.loaded = true;
    edit.name = name || "image.png";
    $("edit-canvas").hidden = $("edit-tools").hidden = $("edit-hint").hidden = false;
    $("mode-edit").checked = true;
    showMode();
  }

  function clearMask() {
    const c = $("edit-mask");
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }

  // --- painting ----------------------------------------------------------------------------------------

  function point(e) {
    const c = $("edit-mask");
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * (c.width / r.width), (e.clientY - r.top) * (c.height / r.height)];
  }

  function stroke(from, to) {
    const c = $("edit-mask");
    const ctx = c.getContext("2d");
    const scale = c.width / c.getBoundingClientRect().width; // brush size in screen pixels
    ctx.globalCompositeOperation = $("edit-eraser").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#ff2d55";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number($("edit-size").value) * scale;
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0] + 0.01, to[1]);
    ctx.stroke();
  }

  function onDown(e) {
    e.preventDefault();
    $("edit-mask").setPointerCapture(e.pointerId);
    edit.drawing = true;
    edit.last = point(e);
    stroke(edit.last, edit.last);
  }

  function onMove(e) {
    if (!edit.drawing) return;
    e.preventDefault();
    const p = point(e);
    stroke(edit.last, p);
    edit.last = p;
  }

  function onUp() { edit.drawing = false; edit.last = null; }

  // --- the request -------------------------------------------------------------------------------------

  function painted() {
    const c = $("edit-mask");
    const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
    return false;
  }

  function blob(canvas) {
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  async function maskBlob() {
    // Opaque everywhere, transparent where painted (OpenAI's convention: transparent = repaint).
    const src = $("edit-mask");
    const c = document.createElement("canvas");
    c.width = src.width;
    c.height = src.height;
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, c.width, c.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(src, 0, 0);
    return blob(c);
  }

  // fields: the generation's JSON fields; returns fetch's Response (the SSE stream or an error).
  async function send(fields, signal, authHeaders) {
    const form = new FormData();
    form.append("image", await blob($("edit-image")), edit.name.replace(/\.\w+$/, "") + ".png");
    if (painted()) form.append("mask", await maskBlob(), "mask.png");
    for (const [k, v] of Object.entries({ ...fields, size: "auto", strength: strength() })) {
      if (v !== undefined && v !== null) form.append(k, String(v));
    }
    return fetch("/v1/images/edits", { method: "POST", headers: { ...authHeaders, Accept: "text/event-stream" },
      body: form, signal });
  }

  function strength() { return Number($("strength").value); }

  // --- wiring ------------------------------------------------------------------------------------------

  for (const id of ["mode-generate", "mode-edit"]) $(id).addEventListener("change", showMode);
  $("edit-file").addEventListener("change", () => {
    const f = $("edit-file").files[0];
    if (f) load(URL.createObjectURL(f), f.name);
  });
  const drop = $("edit-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) load(URL.createObjectURL(f), f.name);
  });
  const mask = $("edit-mask");
  mask.addEventListener("pointerdown", onDown);
  mask.addEventListener("pointermove", onMove);
  for (const name of ["pointerup", "pointercancel", "pointerleave"]) mask.addEventListener(name, onUp);
  $("edit-clear").addEventListener("click", clearMask);
  const showStrength = () => { $("strength-value").textContent = strength().toFixed(2); };
  $("strength").addEventListener("input", showStrength);
  showStrength();
  showMode();

  window.sd35Edit = {
    active: () => inEditMode() && edit.loaded,
    wanted: () => inEditMode() && !edit.loaded,
    send,
    strength,
    masked: () => edit.loaded && painted(),
    load: (src) => load(src).then(() => $("edit-panel").scrollIntoView({ block: "start" })),
  };
})();
