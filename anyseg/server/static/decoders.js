// Two interchangeable mask decoders with one interface:
//   decode(image, prompt, maskInput) -> [{mask: Uint8Array(H*W), score, lowRes: Float32Array(256*256),
//     fullLowRes: async () => the whole low-res map (what a refining click feeds back)}], best first
// OnnxDecoder runs the exported decoder graphs in the page (onnxruntime-web, WebAssembly): a per-image
// graph once per image (the image side of the decoder's first block), then the decoder graph per
// prompt; ServerDecoder asks the server. Prompts are in original-image pixels; the ONNX graph wants the
// model frame (long side resized to the model's input size), so points are scaled here. The graph
// returns low-res logits only; the candidates are upscaled here (upscaleLogits), as the model's
// postprocessing does it. A prompt without a mask prompt runs the server's second decoder graph
// (nomask_url) when there is one: the same function without the mask inputs, less work per click.
import { floatsToBase64, base64ToFloats, rleToMask, upscaleLogits } from './masks.js';
import { getArrayBuffer, getJson, postJson } from './api.js';

export class ServerDecoder {
  constructor() {
    this.name = 'server';
  }

  async prepare() {}

  async decode(image, prompt, maskInput) {
    const body = { multimask: true, format: 'rle', return_logits: true };
    if (prompt.points.length) {
      body.points = prompt.points.map((p) => [p.x, p.y]);
      body.labels = prompt.points.map((p) => p.label);
    }
    if (prompt.box) body.box = [prompt.box.x0, prompt.box.y0, prompt.box.x1, prompt.box.y1];
    if (maskInput) body.mask_input = floatsToBase64(maskInput);
    const result = await postJson(`images/${image.id}/decode`, body);
    const logits = base64ToFloats(result.low_res_logits);
    const side = result.low_res_shape[1] * result.low_res_shape[2];
    return result.masks.map((m, i) => {
      const lowRes = logits.slice(i * side, (i + 1) * side);
      return { mask: rleToMask(m.mask), score: m.score, lowRes, fullLowRes: async () => lowRes };
    });
  }
}

export class OnnxDecoder {
  constructor(ort, session, cacheSession, info, nomaskSession = null) {
    this.name = 'onnx';
    this.queue = Promise.resolve(); // graph runs one at a time, in order
    this.ort = ort;
    this.session = session;
    this.cacheSession = cacheSession;
    this.nomaskSession = nomaskSession;
    this.imgSize = info.img_size;
    this.side = info.mask_side;
    this.images = new Map(); // image id -> promise of the decoder graph's image inputs (ort.Tensor by name), most recent few
  }

  static async create(info) {
    const ort = await import(info.runtime_url);
    ort.env.wasm.wasmPaths = info.runtime_url.replace(/[^/]*$/, '');
    // Threads need cross-origin isolation, which the server's COOP / COEP headers provide.
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const open = async (url) => ort.InferenceSession.create(await getArrayBuffer(url), { executionProviders: ['wasm'] });
    const [session, cacheSession, nomaskSession] = await Promise.all([
      open(info.url), open(info.cache_url), info.nomask_url ? open(info.nomask_url) : null]);
    return new OnnxDecoder(ort, session, cacheSession, info, nomaskSession);
  }

  // Fetch the image embedding and run the per-image graph on it, once per image (a click while that is
  // under way waits for the same work instead of starting it again).
  prepare(image) {
    if (!this.images.has(image.id)) {
      const pending = (async () => {
        const buffer = await getArrayBuffer(`images/${image.id}/embedding`);
        const embedding = new this.ort.Tensor('float32', new Float32Array(buffer), image.embedding_shape);
        return this.cacheSession.run({ image_embeddings: embedding });
      })();
      pending.catch(() => this.images.delete(image.id)); // a failure is retried on the next call
      this.images.set(image.id, pending);
      while (this.images.size > 4) this.images.delete(this.images.keys().next().value);
    }
    return this.images.get(image.id);
  }

  async decode(image, prompt, maskInput) {
    const imageInputs = await this.prepare(image);
    const { Tensor } = this.ort;
    const sx = image.input_width / image.width;
    const sy = image.input_height / image.height;
    const coords = [];
    const labels = [];
    for (const p of prompt.points) {
      coords.push(p.x * sx, p.y * sy);
      labels.push(p.label);
    }
    if (prompt.box) {
      coords.push(prompt.box.x0 * sx, prompt.box.y0 * sy, prompt.box.x1 * sx, prompt.box.y1 * sy);
      labels.push(2, 3);
    } else {
      coords.push(0, 0); // the padding point the graph expects without a box
      labels.push(-1);
    }
    const n = labels.length;
    const side = this.side;
    const feeds = {
      ...imageInputs,
      point_coords: new Tensor('float32', Float32Array.from(coords), [1, n, 2]),
      point_labels: new Tensor('float32', Float32Array.from(labels), [1, n]),
    };
    let session = this.session;
    if (maskInput || !this.nomaskSession) {
      feeds.mask_input = new Tensor('float32', maskInput || new Float32Array(side * side), [1, 1, side, side]);
      feeds.has_mask_input = new Tensor('float32', Float32Array.from([maskInput ? 1 : 0]), [1]);
    } else {
      session = this.nomaskSession;
    }
    // The per-image graph serves both decoder graphs; each takes only the tensors it names.
    for (const key of Object.keys(feeds)) if (!session.inputNames.includes(key)) delete feeds[key];
    // The first-click graph upscales only the image tokens that the shown masks read (upscale_grid, the
    // image's part of the model frame); the whole low-res map, which a refining click feeds back, follows
    // in the background (fullLowRes).
    const grid = side / 4;
    let crop = null;
    if (session.inputNames.includes('upscale_grid')) {
      crop = upscaleGrid([image.input_height, image.input_width], this.imgSize, grid);
      feeds.upscale_grid = new Tensor('float32', new Float32Array(crop[0] * crop[1]), crop);
    }
    const out = await this.run(session, feeds);
    const low = out.low_res_masks;
    const k = low.dims[1];
    // With four outputs, 0 is the single-mask answer and 1..3 the three candidates.
    const picks = k === 4 ? [1, 2, 3] : [...Array(k).keys()];
    const upscale = (lowRes) => upscaleLogits(lowRes, side, this.imgSize, image.input_height, image.input_width,
      image.height, image.width);
    let whole = null;
    if (crop && (crop[0] < grid || crop[1] < grid)) {
      const fullFeeds = { ...feeds, upscale_grid: new Tensor('float32', new Float32Array(grid * grid), [grid, grid]) };
      whole = this.run(session, fullFeeds).then((r) => r.low_res_masks);
      whole.catch(() => {}); // a failure shows when a refining click asks for it
    }
    // Each candidate's full-size mask is computed when first read: the best one right here (it is
    // shown at once), the others only if the user cycles to them.
    const candidates = picks.map((idx) => {
      let lowRes = lowResMap(low, idx, side);
      let mask = null;
      return {
        get mask() { return mask || (mask = upscale(lowRes)); },
        score: out.iou_predictions.data[idx],
        get lowRes() { return lowRes; },
        fullLowRes: whole ? async () => (lowRes = lowResMap(await whole, idx, side)) : async () => lowRes,
      };
    });
    candidates.sort((a, b) => b.score - a.score);
    void candidates[0].mask;
    return candidates;
  }

  run(session, feeds) {
    const result = this.queue.then(() => session.run(feeds));
    this.queue = result.catch(() => {});
    return result;
  }
}

// Token rows and columns (of the grid x grid image tokens) whose upscaled logits the model's
// postprocessing reads for an image resized to inputSize [H, W] in the model frame: the last frame row
// H - 1 reads low-res rows up to floor((H - 0.5) / 4 - 0.5) + 1. (anyseg.export.page_graph.upscale_grid)
export function upscaleGrid(inputSize, imgSize, grid) {
  const perToken = imgSize / grid;
  return inputSize.map((v) => Math.min(grid, Math.floor((v + 1) / perToken) + 1));
}

// Candidate idx of a 1 x k x h x w low-res output as a side x side map; rows and columns past a
// cropped output are very negative (outside the mask; the shown mask never reads them).
function lowResMap(low, idx, side) {
  const [h, w] = [low.dims[2], low.dims[3]];
  const src = low.data.subarray(idx * h * w, (idx + 1) * h * w);
  if (h === side && w === side) return src.slice();
  const map = new Float32Array(side * side).fill(-1e4);
  for (let r = 0; r < h; r++) map.set(src.subarray(r * w, (r + 1) * w), r * side);
  return map;
}

// The best decoder available now: the in-page one when the server has exported its graph and
// ships the runtime, else the server. `onUpgrade` is called if the graph becomes ready later.
export async function chooseDecoder(onUpgrade, log) {
  let info;
  try {
    info = await getJson('decoder');
  } catch (err) {
    log(`decoder info unavailable: ${err.message}`);
    return new ServerDecoder();
  }
  if (info.status === 'ready' && info.runtime_url) {
    try {
      return await OnnxDecoder.create(info);
    } catch (err) {
      log(`in-browser decoder failed to start (${err.message}); decoding on the server`);
      return new ServerDecoder();
    }
  }
  if (!info.runtime_url) log('onnxruntime-web is not installed on the server (make web); decoding on the server');
  else if (info.status === 'unavailable') log(`decoding on the server: ${info.reason}`);
  if (info.status === 'exporting' && info.runtime_url && onUpgrade) {
    setTimeout(async () => onUpgrade(await chooseDecoder(onUpgrade, log)), 2000);
  }
  return new ServerDecoder();
}
