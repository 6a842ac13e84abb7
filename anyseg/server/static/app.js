// anyseg labelling app: open an image, click / drag prompts, cycle candidates, accept and export.
// Coordinates in the state are original-image pixels (X right, Y down).
import { ApiError, download, getBlob, getJson, postJson, request, uploadImage } from './api.js';
import { chooseDecoder } from './decoders.js';
import { cocoRleToMask, colour, maskArea, maskToRle, paintMasks, rleToMask } from './masks.js';

const $ = (id) => document.getElementById(id);
const imageCanvas = $('image-canvas');
const objectsCanvas = $('objects-canvas');
const overlayCanvas = $('overlay-canvas');

const emptyPrompt = () => ({ points: [], box: null });

const state = {
  image: null, // server ImageInfo: id, name, width, height, input_width, input_height, embedding_shape
  prompt: emptyPrompt(),
  result: null, // {candidates: [{mask, score, lowRes}], index}
  history: [], // earlier {prompt, result}
  future: [],
  everything: null, // [{mask, score}]
  objects: [], // [{id, label, mask, colour}]
  decoder: null,
  decodeSeq: 0,
  busy: 0,
};

// Read-only view for people poking in the console and for the end-to-end test.
window.anyseg = {
  state,
  decodeTimes: [],
  decodeCount: 0,
  get backend() {
    return state.decoder ? state.decoder.name : 'none';
  },
  get busy() {
    return state.busy > 0;
  },
};

function setStatus(text, isError = false) {
  const el = $('status');
  el.textContent = text;
  el.classList.toggle('error', isError);
}

function log(text) {
  console.info(`[anyseg] ${text}`);
}

async function busy(task, label) {
  state.busy++;
  document.body.dataset.busy = 'true';
  if (label) setStatus(label);
  try {
    return await task();
  } catch (err) {
    setStatus(err instanceof ApiError ? `${err.status}: ${err.message}` : `error: ${err.message}`, true);
    console.error(err);
    return undefined;
  } finally {
    state.busy--;
    if (!state.busy) document.body.dataset.busy = 'false';
  }
}

// ------------------------------------------------------------------------------------ drawing
function sizeCanvases(w, h) {
  for (const c of [imageCanvas, objectsCanvas, overlayCanvas]) {
    c.width = w;
    c.height = h;
  }
  fitCanvases();
}

// Show the whole image as large as the stage allows (canvas pixels stay image pixels).
function fitCanvases() {
  if (!state.image && !imageCanvas.width) return;
  const wrap = $('canvas-wrap');
  const box = $('stage').getBoundingClientRect();
  const scale = Math.min((box.width - 20) / imageCanvas.width, (box.height - 20) / imageCanvas.height);
  wrap.style.width = `${Math.max(1, Math.floor(imageCanvas.width * scale))}px`;
  wrap.style.height = `${Math.max(1, Math.floor(imageCanvas.height * scale))}px`;
}

window.addEventListener('resize', fitCanvases);

function drawObjects() {
  if (!state.image) return;
  const ctx = objectsCanvas.getContext('2d');
  const img = ctx.createImageData(state.image.width, state.image.height);
  paintMasks(img, state.objects.map((o) => ({ mask: o.mask, rgb: o.colour, alpha: 0.45 })));
  ctx.putImageData(img, 0, 0);
}

function drawOverlay(dragBox = null) {
  if (!state.image) return;
  const { width: w, height: h } = state.image;
  const ctx = overlayCanvas.getContext('2d');
  const layers = [];
  if (state.everything) {
    state.everything.forEach((m, i) => layers.push({ mask: m.mask, rgb: colour(i), alpha: 0.55 }));
  } else if (state.result) {
    layers.push({ mask: state.result.candidates[state.result.index].mask, rgb: [30, 144, 255], alpha: 0.55 });
  }
  ctx.putImageData(paintMasks(ctx.createImageData(w, h), layers), 0, 0);
  const r = Math.max(4, Math.round(Math.max(w, h) / 160));
  for (const p of state.prompt.points) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, r, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === 1 ? '#22c55e' : '#ef4444';
    ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3);
    ctx.strokeStyle = '#ffffff';
    ctx.stroke();
  }
  const box = dragBox || state.prompt.box;
  if (box) {
    ctx.lineWidth = Math.max(2, r / 2);
    ctx.strokeStyle = dragBox ? '#facc15' : '#2563eb';
    ctx.strokeRect(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0);
  }
  updateControls();
}

function updateControls() {
  const res = state.result;
  $('candidate-info').textContent = res
    ? `mask ${res.index + 1}/${res.candidates.length} · score ${res.candidates[res.index].score.toFixed(3)}`
    : state.everything ? `${state.everything.length} masks` : '';
  $('undo').disabled = !state.history.length;
  $('redo').disabled = !state.future.length;
  $('cycle').disabled = !res || res.candidates.length < 2;
  $('accept').disabled = !res;
  $('everything').disabled = !state.image;
  $('backend').textContent = state.decoder ? `decoder: ${state.decoder.name}` : '';
}

// ------------------------------------------------------------------------------------ prompts
function snapshot() {
  return { prompt: structuredClone(state.prompt), result: state.result };
}

function restore(snap) {
  state.prompt = snap.prompt;
  state.result = snap.result;
  drawOverlay();
}

async function changePrompt(mutate) {
  if (!state.image) return;
  state.history.push(snapshot());
  state.future = [];
  state.everything = null;
  const previous = state.result;
  mutate(state.prompt);
  drawOverlay();
  // Refinement: the chosen candidate's low-res logits go back in with the new prompt.
  const maskInput = previous && state.prompt.points.length > 1 ? previous.candidates[previous.index].lowRes : null;
  await runDecode(maskInput);
}

async function runDecode(maskInput) {
  const seq = ++state.decodeSeq;
  const image = state.image;
  const prompt = structuredClone(state.prompt);
  if (!prompt.points.length && !prompt.box) {
    state.result = null;
    drawOverlay();
    return;
  }
  await busy(async () => {
    const t0 = performance.now();
    const candidates = await state.decoder.decode(image, prompt, maskInput);
    const ms = performance.now() - t0;
    if (seq !== state.decodeSeq || image !== state.image) return; // a newer prompt won
    window.anyseg.decodeTimes.push({ backend: state.decoder.name, ms });
    window.anyseg.decodeCount++;
    state.result = { candidates, index: 0 };
    drawOverlay();
    setStatus(`decoded in ${ms.toFixed(1)} ms (${state.decoder.name})`);
  });
}

function undo() {
  if (!state.history.length) return;
  state.future.push(snapshot());
  restore(state.history.pop());
}

function redo() {
  if (!state.future.length) return;
  state.history.push(snapshot());
  restore(state.future.pop());
}

function clearPrompt() {
  if (!state.prompt.points.length && !state.prompt.box && !state.everything) return;
  state.history.push(snapshot());
  state.future = [];
  state.prompt = emptyPrompt();
  state.result = null;
  state.everything = null;
  drawOverlay();
}

function cycle() {
  if (!state.result) return;
  state.result.index = (state.result.index + 1) % state.result.candidates.length;
  drawOverlay();
}

// ------------------------------------------------------------------------------------ pointer
let drag = null;

function toImage(event) {
  const rect = overlayCanvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * overlayCanvas.width;
  const y = ((event.clientY - rect.top) / rect.height) * overlayCanvas.height;
  return {
    x: Math.min(Math.max(x, 0), overlayCanvas.width - 1),
    y: Math.min(Math.max(y, 0), overlayCanvas.height - 1),
  };
}

function boxFrom(a, b) {
  return { x0: Math.min(a.x, b.x), y0: Math.min(a.y, b.y), x1: Math.max(a.x, b.x), y1: Math.max(a.y, b.y) };
}

overlayCanvas.addEventListener('contextmenu', (e) => e.preventDefault());
overlayCanvas.addEventListener('pointerdown', (e) => {
  if (!state.image) return;
  overlayCanvas.setPointerCapture(e.pointerId);
  drag = { start: toImage(e), screen: { x: e.clientX, y: e.clientY }, button: e.button, alt: e.altKey, moved: false };
});
overlayCanvas.addEventListener('pointermove', (e) => {
  if (!drag || drag.button !== 0) return;
  if (Math.hypot(e.clientX - drag.screen.x, e.clientY - drag.screen.y) > 5) drag.moved = true;
  if (drag.moved) drawOverlay(boxFrom(drag.start, toImage(e)));
});
overlayCanvas.addEventListener('pointerup', (e) => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (d.moved && d.button === 0) {
    const box = boxFrom(d.start, toImage(e));
    if (box.x1 - box.x0 >= 2 && box.y1 - box.y0 >= 2) changePrompt((p) => { p.box = box; });
    else drawOverlay();
    return;
  }
  const background = d.button === 2 || d.alt;
  if (d.button !== 0 && d.button !== 2) return;
  changePrompt((p) => p.points.push({ ...d.start, label: background ? 0 : 1 }));
});

document.addEventListener('keydown', (e) => {
  if (e.target instanceof HTMLInputElement) {
    if (e.key === 'Enter') return; // the form handles it
    return;
  }
  const mod = e.ctrlKey || e.metaKey;
  if (mod && e.key.toLowerCase() === 'z') {
    e.preventDefault();
    if (e.shiftKey) redo();
    else undo();
  } else if (mod && e.key.toLowerCase() === 'y') {
    e.preventDefault();
    redo();
  } else if (e.key === 'Tab' || e.key === 'c') {
    e.preventDefault();
    cycle();
  } else if (e.key === 'Escape') {
    clearPrompt();
  } else if (e.key === 'Enter') {
    acceptObject();
  }
});

// ------------------------------------------------------------------------------------- images
async function loadBitmap(blob, info) {
  try {
    const bitmap = await createImageBitmap(blob, { imageOrientation: 'from-image' });
    if (bitmap.width === info.width && bitmap.height === info.height) return bitmap;
  } catch (err) {
    /* a format the browser cannot decode (16-bit TIFF, ...): use the server's decoding */
  }
  return createImageBitmap(await getBlob(`images/${info.id}/image.png`));
}

async function openImage(encode, blobOf) {
  await busy(async () => {
    const info = await encode();
    const bitmap = await loadBitmap(await blobOf(info), info);
    state.image = info;
    state.prompt = emptyPrompt();
    state.result = null;
    state.history = [];
    state.future = [];
    state.everything = null;
    sizeCanvases(info.width, info.height);
    imageCanvas.getContext('2d').drawImage(bitmap, 0, 0);
    $('drop-hint').hidden = true;
    $('canvas-wrap').hidden = false;
    fitCanvases();
    await loadObjects();
    if (state.decoder.prepare) await state.decoder.prepare(info);
    drawOverlay();
    document.body.dataset.image = info.id;
    setStatus(`${info.name || 'image'}: ${info.width}x${info.height}${info.cached ? ' (cached)' : ''}`);
  }, 'encoding image...');
}

function openFile(file) {
  return openImage(() => uploadImage(file), async () => file);
}

function openFolderImage(path) {
  return openImage(
    () => postJson('images/from-file', { path }),
    () => getBlob(`files/raw?path=${encodeURIComponent(path)}`),
  );
}

$('file-input').addEventListener('change', (e) => {
  if (e.target.files.length) openFile(e.target.files[0]);
  e.target.value = '';
});
const stage = $('stage');
stage.addEventListener('dragover', (e) => {
  e.preventDefault();
  stage.classList.add('dragging');
});
stage.addEventListener('dragleave', () => stage.classList.remove('dragging'));
stage.addEventListener('drop', (e) => {
  e.preventDefault();
  stage.classList.remove('dragging');
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith('image/')) || e.dataTransfer.files[0];
  if (file) openFile(file);
});

async function loadFolder() {
  const health = await getJson('health');
  if (!health.images_dir) return;
  const { files } = await getJson('files');
  const list = $('file-list');
  list.replaceChildren(...files.map((path) => {
    const li = document.createElement('li');
    const button = document.createElement('button');
    button.textContent = path;
    button.addEventListener('click', () => openFolderImage(path));
    li.append(button);
    return li;
  }));
  $('files-panel').hidden = false;
}

// ------------------------------------------------------------------------------------ objects
function addObject(ann) {
  const mask = cocoRleToMask(ann.segmentation);
  state.objects.push({ id: ann.id, label: ann.label, mask, colour: colour(ann.id) });
}

async function loadObjects() {
  state.objects = [];
  const { annotations } = await getJson(`annotations?image_id=${state.image.id}`);
  annotations.forEach(addObject);
  renderObjectList();
  drawObjects();
}

function renderObjectList() {
  $('object-list').replaceChildren(...state.objects.map((o) => {
    const li = document.createElement('li');
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = `rgb(${o.colour.join(',')})`;
    const name = document.createElement('span');
    name.textContent = `${o.label} (${maskArea(o.mask)} px)`;
    const remove = document.createElement('button');
    remove.textContent = '×';
    remove.title = 'delete this object';
    remove.addEventListener('click', () => busy(async () => {
      await request(`annotations/${o.id}`, { method: 'DELETE' });
      state.objects = state.objects.filter((x) => x.id !== o.id);
      renderObjectList();
      drawObjects();
    }));
    li.append(swatch, name, remove);
    return li;
  }));
  $('object-count').textContent = String(state.objects.length);
}

async function acceptObject() {
  if (!state.result || !state.image) return;
  const { width: w, height: h, id } = state.image;
  const candidate = state.result.candidates[state.result.index];
  const label = $('label-input').value.trim() || 'object';
  await busy(async () => {
    const ann = await postJson('annotations', {
      image_id: id, label, score: candidate.score, segmentation: maskToRle(candidate.mask, h, w),
    });
    addObject(ann);
    renderObjectList();
    drawObjects();
    state.prompt = emptyPrompt();
    state.result = null;
    state.history = [];
    state.future = [];
    drawOverlay();
    setStatus(`saved "${label}"`);
  }, 'saving...');
}

$('accept-form').addEventListener('submit', (e) => {
  e.preventDefault();
  acceptObject();
});

async function segmentEverything() {
  if (!state.image) return;
  const number = (id, fallback) => (Number.isFinite(parseFloat($(id).value)) ? parseFloat($(id).value) : fallback);
  const body = {
    points_per_side: Math.round(number('everything-points', 16)),
    pred_iou_thresh: number('everything-iou', 0.88),
    stability_score_thresh: number('everything-stability', 0.95),
    format: 'rle',
  };
  await busy(async () => {
    const result = await postJson(`images/${state.image.id}/everything`, body);
    state.history.push(snapshot());
    state.prompt = emptyPrompt();
    state.result = null;
    state.everything = result.masks.map((m) => ({ mask: rleToMask(m.mask), score: m.predicted_iou }));
    drawOverlay();
    setStatus(`${result.masks.length} masks in ${(result.elapsed_ms / 1000).toFixed(1)} s`);
  }, 'segmenting everything...');
}

// ------------------------------------------------------------------------------------- wiring
$('undo').addEventListener('click', undo);
$('redo').addEventListener('click', redo);
$('clear').addEventListener('click', clearPrompt);
$('cycle').addEventListener('click', cycle);
$('everything').addEventListener('click', segmentEverything);

function imageStem() {
  const name = (state.image && state.image.name) || 'image';
  return name.split('/').pop().replace(/\.[^.]*$/, '') || 'image';
}

$('export-png').addEventListener('click', () => state.image && busy(
  () => download(`export/masks.png?image_id=${state.image.id}`, `${imageStem()}_masks.png`)));
$('export-coco').addEventListener('click', () => busy(() => download('export/coco', 'annotations_coco.json')));
$('export-polygons').addEventListener('click', () => busy(
  () => download('export/polygons', 'annotations_polygons.json')));

async function start() {
  await busy(async () => {
    state.decoder = await chooseDecoder((better) => {
      if (better.name !== state.decoder.name) {
        state.decoder = better;
        log(`switched to the ${better.name} decoder`);
        updateControls();
      }
    }, log);
    await loadFolder();
  });
  updateControls();
  document.body.dataset.ready = 'true';
  setStatus('open or drop an image');
}

start();
