// anyseg labelling app: open an image, click / drag prompts, cycle candidates, accept and export.
// Coordinates in the state are original-image pixels (X right, Y down).
import { ApiError, download, getBlob, getJson, postJson, request, uploadImage } from './api.js';
import { chooseDecoder } from './decoders.js';
import { cocoRleToMask, colour, maskArea, maskToRle, paintMasks, rleToMask } from './masks.js';

const $ = (id) => document.getElementById(id);
const imageCanvas = $('image-canvas');
const objectsCanvas = $('objects-canvas');
const overlayCanvas = $('overlay-canvas');
const proposalsCanvas = $('proposals-canvas');

const emptyPrompt = () => ({ points: [], box: null });

const state = {
  image: null, // server ImageInfo: id, name, width, height, input_width, input_height, embedding_shape
  prompt: emptyPrompt(),
  result: null, // {candidates: [{mask, score, lowRes}], index}
  history: [], // earlier {prompt, result}
  future: [],
  everything: null, // [{mask, score}]
  objects: [], // [{id, label, mask, colour, provenance}]
  // Auto-label proposals: their own layer, not objects until accepted. clock: when the annotator's time
  // on the proposals last started (shown, or the previous accept / reject).
  proposals: null, // {model, clock, items: [{key, mask, rle, score, area, colour, status}]} status: shown|hidden
  effort: { start: null, clicks: 0 }, // the object being made by clicks: first click time, prompt count
  modelName: '',
  overlapThresh: 0.5,
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
  for (const c of [imageCanvas, objectsCanvas, proposalsCanvas, overlayCanvas]) {
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

function shownProposals() {
  return state.proposals ? state.proposals.items.filter((p) => p.status === 'shown') : [];
}

// Proposals are drawn lighter than accepted objects, in yellow-to-orange tints, each outlined by its
// own colour in the list; a highlighted one (hovered in the list) is drawn stronger.
function drawProposals() {
  if (!state.image) return;
  const ctx = proposalsCanvas.getContext('2d');
  const layers = shownProposals().map((p) => ({ mask: p.mask, rgb: p.colour, alpha: p.highlight ? 0.6 : 0.3 }));
  ctx.putImageData(paintMasks(ctx.createImageData(state.image.width, state.image.height), layers), 0, 0);
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
  $('auto-label').disabled = !state.image;
  const shown = shownProposals().length;
  $('accept-all-proposals').disabled = !shown;
  $('reject-all-proposals').disabled = !shown;
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
  if (state.effort.start === null) state.effort.start = performance.now();
  state.effort.clicks++;
  mutate(state.prompt);
  drawOverlay();
  // Refinement: the chosen candidate's low-res logits go back in with the new prompt.
  // (fullLowRes: the whole map, where the in-page decoder first computed only the image's part of it.)
  const chosen = previous && state.prompt.points.length > 1 ? previous.candidates[previous.index] : null;
  const maskInput = chosen ? await chosen.fullLowRes() : null;
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
    state.proposals = null;
    state.effort = { start: null, clicks: 0 };
    renderProposals();
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
  state.objects.push({ id: ann.id, label: ann.label, mask, colour: colour(ann.id), provenance: ann.provenance || null });
}

const STAGE_NAMES = { manual: 'manual', assisted: 'clicks', auto: 'auto-accepted' };

function describeProvenance(p) {
  if (!p) return 'no provenance';
  const parts = [STAGE_NAMES[p.stage] || p.stage];
  if (p.stage !== 'auto' || p.clicks) parts.push(`${p.clicks} click${p.clicks === 1 ? '' : 's'}`);
  if (p.seconds !== null && p.seconds !== undefined) parts.push(`${p.seconds.toFixed(1)} s`);
  if (p.model) parts.push(p.model);
  return parts.join(' · ');
}

async function loadObjects() {
  state.objects = [];
  const { annotations } = await getJson(`annotations?image_id=${state.image.id}`);
  annotations.forEach(addObject);
  renderObjectList();
  drawObjects();
  await loadStats();
}

function renderObjectList() {
  $('object-list').replaceChildren(...state.objects.map((o) => {
    const li = document.createElement('li');
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = `rgb(${o.colour.join(',')})`;
    const name = document.createElement('span');
    name.textContent = `${o.label} (${maskArea(o.mask)} px)`;
    const prov = document.createElement('span');
    prov.className = 'provenance';
    prov.textContent = describeProvenance(o.provenance);
    if (o.provenance) li.dataset.stage = o.provenance.stage;
    name.append(prov);
    const remove = document.createElement('button');
    remove.textContent = '×';
    remove.title = 'delete this object';
    remove.addEventListener('click', () => busy(async () => {
      await request(`annotations/${o.id}`, { method: 'DELETE' });
      state.objects = state.objects.filter((x) => x.id !== o.id);
      renderObjectList();
      drawObjects();
      updateProposals();
      await loadStats();
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
  const { start, clicks } = state.effort;
  const seconds = start === null ? null : (performance.now() - start) / 1000;
  await busy(async () => {
    const ann = await postJson('annotations', {
      image_id: id, label, score: candidate.score, segmentation: maskToRle(candidate.mask, h, w),
      provenance: { stage: 'assisted', model: state.modelName || null, clicks, seconds },
    });
    addObject(ann);
    renderObjectList();
    drawObjects();
    state.prompt = emptyPrompt();
    state.result = null;
    state.history = [];
    state.future = [];
    state.effort = { start: null, clicks: 0 };
    drawOverlay();
    updateProposals();
    await loadStats();
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

// ------------------------------------------------------------------------ auto-label proposals
async function autoLabel() {
  if (!state.image) return;
  const number = (id, fallback) => (Number.isFinite(parseFloat($(id).value)) ? parseFloat($(id).value) : fallback);
  const body = {
    points_per_side: Math.round(number('everything-points', 16)),
    pred_iou_thresh: number('auto-iou', 0.9),
    stability_score_thresh: number('auto-stability', 0.95),
    overlap_thresh: state.overlapThresh,
    format: 'coco_rle',
  };
  const image = state.image;
  await busy(async () => {
    const result = await postJson(`images/${image.id}/auto-label`, body);
    if (image !== state.image) return;
    state.proposals = {
      model: result.model,
      clock: performance.now(),
      items: result.proposals.map((p, i) => ({
        key: i, mask: cocoRleToMask(p.mask), rle: p.mask, score: p.predicted_iou, area: p.area,
        colour: [250, 204 - ((i * 37) % 120), 21 + ((i * 53) % 90)], status: 'shown',
      })),
    };
    updateProposals();
    const hidden = result.hidden ? `, ${result.hidden} already covered` : '';
    setStatus(`${result.proposals.length} proposals from ${result.model} in ${(result.elapsed_ms / 1000).toFixed(1)} s${hidden}`);
  }, 'auto-labelling...');
}

// Hide proposals that accepted objects now cover (as the server does when it proposes).
function updateProposals() {
  if (state.proposals && state.image) {
    const n = state.image.width * state.image.height;
    const covered = new Uint8Array(n);
    for (const o of state.objects) for (let i = 0; i < n; i++) if (o.mask[i]) covered[i] = 1;
    for (const p of state.proposals.items) {
      if (p.status !== 'shown') continue;
      let inside = 0;
      for (let i = 0; i < n; i++) if (p.mask[i] && covered[i]) inside++;
      if (p.area && inside / p.area >= state.overlapThresh) p.status = 'hidden';
    }
  }
  renderProposals();
}

function renderProposals() {
  const shown = shownProposals();
  $('proposals-panel').hidden = !state.proposals;
  $('proposal-count').textContent = String(shown.length);
  $('proposal-list').replaceChildren(...shown.map((p) => {
    const li = document.createElement('li');
    li.dataset.key = String(p.key);
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = `rgb(${p.colour.join(',')})`;
    const text = document.createElement('span');
    text.textContent = `${p.score.toFixed(3)} · ${p.area} px`;
    const yes = document.createElement('button');
    yes.className = 'accept-proposal';
    yes.textContent = '✓';
    yes.title = 'accept this proposal as an object';
    yes.addEventListener('click', () => acceptProposals([p]));
    const no = document.createElement('button');
    no.className = 'reject-proposal';
    no.textContent = '×';
    no.title = 'reject this proposal';
    no.addEventListener('click', () => rejectProposals([p]));
    li.addEventListener('mouseenter', () => { p.highlight = true; li.classList.add('highlight'); drawProposals(); });
    li.addEventListener('mouseleave', () => { p.highlight = false; li.classList.remove('highlight'); drawProposals(); });
    li.append(swatch, text, yes, no);
    return li;
  }));
  drawProposals();
  updateControls();
}

// The annotator's time since the proposals were shown (or the last decision on one), shared out over
// the proposals decided now.
function proposalSeconds(count) {
  const now = performance.now();
  const seconds = (now - state.proposals.clock) / 1000 / Math.max(1, count);
  state.proposals.clock = now;
  return seconds;
}

async function acceptProposals(items) {
  if (!state.image || !state.proposals || !items.length) return;
  const { id } = state.image;
  const label = $('label-input').value.trim() || 'object';
  const seconds = proposalSeconds(items.length);
  const model = state.proposals.model;
  await busy(async () => {
    for (const p of items) {
      if (p.status !== 'shown') continue; // hidden by an earlier one of this batch
      const ann = await postJson('annotations', {
        image_id: id, label, score: p.score, segmentation: p.rle,
        provenance: { stage: 'auto', model, clicks: 0, seconds },
      });
      p.status = 'accepted';
      addObject(ann);
      updateProposals();
    }
    renderObjectList();
    drawObjects();
    await loadStats();
    setStatus(`accepted ${items.length} proposal${items.length === 1 ? '' : 's'} as "${label}"`);
  }, 'saving...');
}

function rejectProposals(items) {
  if (!state.proposals) return;
  proposalSeconds(items.length); // the time spent deciding is not charged to the next accepted one
  for (const p of items) p.status = 'rejected';
  renderProposals();
  setStatus(`rejected ${items.length} proposal${items.length === 1 ? '' : 's'}`);
}

// ------------------------------------------------------------------------------------ stats
async function loadStats() {
  const stats = await getJson('stats');
  const here = state.image ? state.objects.length : 0;
  const fmt = (v, digits = 1) => (v === null || v === undefined ? '–' : Number(v).toFixed(digits));
  const rows = [
    ['objects here', String(here)],
    ['objects', String(stats.objects)],
    ['images', String(stats.images)],
    ['masks / image', fmt(stats.masks_per_image)],
    ['s / mask', fmt(stats.seconds_per_mask)],
    ['clicks / mask', fmt(stats.clicks_per_mask)],
  ];
  for (const [stage, s] of Object.entries(stats.stages)) {
    if (s.objects || stage !== 'unknown') rows.push([STAGE_NAMES[stage] || stage, `${s.objects} · ${(100 * s.share).toFixed(0)}%`]);
  }
  const panel = $('stats-panel');
  panel.replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    dd.dataset.stat = k;
    return [dt, dd];
  }));
  window.anyseg.stats = stats;
}

// ----------------------------------------------------------------------------------- models
async function loadModels() {
  const models = await getJson('models');
  const select = $('model-select');
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement('option');
    option.value = m.name;
    option.textContent = m.name;
    option.selected = m.loaded;
    return option;
  }));
  const loaded = models.find((m) => m.loaded);
  state.modelName = loaded ? loaded.name : '';
}

async function switchModel(name) {
  if (!name || name === state.modelName) return;
  await busy(async () => {
    const info = await postJson('models/switch', { name });
    state.modelName = info.name;
    // The page's decoder follows: the new model's graphs once exported, the server until then.
    state.decoder = await chooseDecoder(upgradeDecoder, log);
    if (state.image && state.decoder.prepare) await state.decoder.prepare(state.image);
    await loadModels();
    updateControls();
    setStatus(`now using model ${info.name}`);
  }, `switching to ${name}...`);
  if (state.modelName !== name) $('model-select').value = state.modelName; // the switch failed
}

function upgradeDecoder(better) {
  if (better.name !== state.decoder.name) {
    state.decoder = better;
    log(`switched to the ${better.name} decoder`);
    updateControls();
  }
}

$('model-select').addEventListener('focus', () => loadModels().catch(() => {}));
$('model-select').addEventListener('change', (e) => switchModel(e.target.value));
$('auto-label').addEventListener('click', autoLabel);
$('accept-all-proposals').addEventListener('click', () => acceptProposals(shownProposals()));
$('reject-all-proposals').addEventListener('click', () => rejectProposals(shownProposals()));

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
    state.decoder = await chooseDecoder(upgradeDecoder, log);
    await loadModels();
    await loadFolder();
    await loadStats();
  });
  updateControls();
  document.body.dataset.ready = 'true';
  setStatus('open or drop an image');
}

start();
