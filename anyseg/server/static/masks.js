// Mask helpers: run-length encodings and colours. Masks are Uint8Array(H * W), row-major, 1 = object.

// Uncompressed column-major RLE {size: [H, W], counts: [zeros, ones, zeros, ...]} -> mask.
export function rleToMask(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let pos = 0;
  let value = 0;
  for (const count of rle.counts) {
    if (value) {
      for (let i = pos; i < pos + count; i++) {
        const col = Math.floor(i / h);
        mask[(i - col * h) * w + col] = 1;
      }
    }
    pos += count;
    value ^= 1;
  }
  return mask;
}

// Mask -> uncompressed column-major RLE (what the server accepts as a segmentation).
export function maskToRle(mask, h, w) {
  const counts = [];
  let current = 0;
  let run = 0;
  for (let col = 0; col < w; col++) {
    for (let row = 0; row < h; row++) {
      const v = mask[row * w + col];
      if (v !== current) {
        counts.push(run);
        run = 0;
        current = v;
      }
      run++;
    }
  }
  counts.push(run);
  return { size: [h, w], counts };
}

// COCO compressed RLE counts string (pycocotools' format) -> counts list.
export function cocoCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

export function cocoRleToMask(rle) {
  const counts = typeof rle.counts === 'string' ? cocoCounts(rle.counts) : rle.counts;
  return rleToMask({ size: rle.size, counts });
}

export function maskArea(mask) {
  let n = 0;
  for (let i = 0; i < mask.length; i++) n += mask[i];
  return n;
}

const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
  [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [0, 0, 128],
];

export function colour(i) {
  return PALETTE[((i % PALETTE.length) + PALETTE.length) % PALETTE.length];
}

// Paint masks into an ImageData: each {mask, rgb, alpha}; later masks on top.
export function paintMasks(imageData, layers) {
  const data = imageData.data;
  data.fill(0);
  for (const { mask, rgb, alpha } of layers) {
    const a = Math.round(alpha * 255);
    for (let i = 0; i < mask.length; i++) {
      if (mask[i]) {
        const o = 4 * i;
        data[o] = rgb[0];
        data[o + 1] = rgb[1];
        data[o + 2] = rgb[2];
        data[o + 3] = a;
      }
    }
  }
  return imageData;
}

// Float32Array <-> base64 of little-endian float32 bytes (the API's encoding of arrays).
export function floatsToBase64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  let text = '';
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(text);
}

export function base64ToFloats(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

// Upscaling of low-res mask logits to the original image, as the model's postprocessing does it:
// bilinear (half-pixel centres) from side x side to img_size x img_size, crop to the resized image
// (inputH x inputW, the model frame), bilinear again to H x W. Both steps are linear and separable, so
// each output row (column) is a fixed mix of at most four low-res rows (columns); the weights are
// computed once per axis and the two passes touch each output pixel once.
function axisTaps(outLen, cropLen, side, imgSize) {
  const idx = new Int32Array(outLen * 4);
  const wt = new Float32Array(outLen * 4);
  const source = (i, inLen, outLenHere) => Math.max(0, (i + 0.5) * (inLen / outLenHere) - 0.5);
  for (let o = 0; o < outLen; o++) {
    const s2 = source(o, cropLen, outLen);
    const r0 = Math.floor(s2);
    const rows = [r0, Math.min(r0 + 1, cropLen - 1)];
    const rowWeights = [1 - (s2 - r0), s2 - r0];
    for (let j = 0; j < 2; j++) {
      const s1 = source(rows[j], side, imgSize);
      const a0 = Math.floor(s1);
      idx[o * 4 + 2 * j] = a0;
      idx[o * 4 + 2 * j + 1] = Math.min(a0 + 1, side - 1);
      wt[o * 4 + 2 * j] = rowWeights[j] * (1 - (s1 - a0));
      wt[o * 4 + 2 * j + 1] = rowWeights[j] * (s1 - a0);
    }
  }
  return { idx, wt };
}

const tapCache = new Map();
function taps(outLen, cropLen, side, imgSize) {
  const key = `${outLen}/${cropLen}/${side}/${imgSize}`;
  if (!tapCache.has(key)) {
    if (tapCache.size > 16) tapCache.clear();
    tapCache.set(key, axisTaps(outLen, cropLen, side, imgSize));
  }
  return tapCache.get(key);
}

// logits: Float32Array(side * side), row-major. Returns the mask Uint8Array(H * W) (logit > 0).
// Only the part of the image that can be inside the mask is computed: every weight is >= 0, so a pixel
// whose low-res rows (columns) all lie outside the rows (columns) holding a positive logit has a value
// <= 0 and stays 0. The result is the same as computing every pixel.
export function upscaleLogits(logits, side, imgSize, inputH, inputW, H, W) {
  const mask = new Uint8Array(H * W);
  let r0 = side, r1 = -1, c0 = side, c1 = -1;
  for (let r = 0; r < side; r++) {
    const row = r * side;
    for (let c = 0; c < side; c++) {
      if (logits[row + c] > 0) {
        if (r < r0) r0 = r;
        r1 = r;
        if (c < c0) c0 = c;
        if (c > c1) c1 = c;
      }
    }
  }
  if (r1 < 0) return mask; // no positive logit: an empty mask
  const ty = taps(H, inputH, side, imgSize);
  const tx = taps(W, inputW, side, imgSize);
  const touches = (t, o, lo, hi) => {
    for (let j = 0; j < 4; j++) if (t.idx[o * 4 + j] >= lo && t.idx[o * 4 + j] <= hi) return true;
    return false;
  };
  let y0 = 0, y1 = H - 1, x0 = 0, x1 = W - 1; // the taps grow with the output index
  while (y0 < H && !touches(ty, y0, r0, r1)) y0++;
  while (y1 > y0 && !touches(ty, y1, r0, r1)) y1--;
  while (x0 < W && !touches(tx, x0, c0, c1)) x0++;
  while (x1 > x0 && !touches(tx, x1, c0, c1)) x1--;
  if (y0 >= H || x0 >= W) return mask;
  // the low-res columns that pixels x0..x1 read (the taps grow with x)
  const cLo = Math.min(tx.idx[x0 * 4], tx.idx[x0 * 4 + 2]);
  const cHi = Math.max(tx.idx[x1 * 4 + 1], tx.idx[x1 * 4 + 3]);
  const rows = new Float32Array((y1 - y0 + 1) * side); // vertical pass: rows y0..y1, columns cLo..cHi
  for (let y = y0; y <= y1; y++) {
    const o = y * 4;
    const a0 = ty.idx[o] * side, a1 = ty.idx[o + 1] * side, a2 = ty.idx[o + 2] * side, a3 = ty.idx[o + 3] * side;
    const w0 = ty.wt[o], w1 = ty.wt[o + 1], w2 = ty.wt[o + 2], w3 = ty.wt[o + 3];
    const out = (y - y0) * side;
    for (let c = cLo; c <= cHi; c++) {
      rows[out + c] = w0 * logits[a0 + c] + w1 * logits[a1 + c] + w2 * logits[a2 + c] + w3 * logits[a3 + c];
    }
  }
  // Horizontal pass. A pixel's value is a convex mix of its taps, so where all its taps have one sign the
  // pixel has it too: along each row the low-res columns form runs of one sign, and the pixels whose
  // taps fall inside one run are filled at once; only the pixels across a sign change are mixed.
  const { idx, wt } = tx; // per pixel x, the taps idx[4x] <= ... <= idx[4x + 3], growing with x
  const lastX = new Int32Array(side); // the last pixel whose taps all lie at or left of column c
  for (let c = 0, x = x0; c < side; c++) {
    while (x <= x1 && idx[x * 4 + 3] <= c) x++;
    lastX[c] = x - 1;
  }
  const runEnd = new Int32Array(side); // the last column of the one-sign run that holds column c
  for (let y = y0; y <= y1; y++) {
    const row = (y - y0) * side;
    runEnd[cHi] = cHi;
    let runs = 1;
    for (let c = cHi - 1; c >= cLo; c--) {
      if ((rows[row + c] > 0) === (rows[row + c + 1] > 0)) {
        runEnd[c] = runEnd[c + 1];
      } else {
        runEnd[c] = c;
        runs++;
      }
    }
    const out = y * W;
    let x = x0;
    if (4 * runs > cHi - cLo) {
      // Short runs (a ragged map): mixing every pixel is faster than looking for runs.
      for (; x <= x1; x++) {
        const o = x * 4;
        const v = wt[o] * rows[row + idx[o]] + wt[o + 1] * rows[row + idx[o + 1]]
          + wt[o + 2] * rows[row + idx[o + 2]] + wt[o + 3] * rows[row + idx[o + 3]];
        mask[out + x] = v > 0 ? 1 : 0;
      }
      continue;
    }
    while (x <= x1) {
      const o = x * 4;
      const end = runEnd[idx[o]];
      if (idx[o + 3] <= end) {
        const stop = Math.min(lastX[end], x1);
        if (rows[row + idx[o]] > 0) mask.fill(1, out + x, out + stop + 1);
        x = stop + 1;
      } else {
        const v = wt[o] * rows[row + idx[o]] + wt[o + 1] * rows[row + idx[o + 1]]
          + wt[o + 2] * rows[row + idx[o + 2]] + wt[o + 3] * rows[row + idx[o + 3]];
        mask[out + x] = v > 0 ? 1 : 0;
        x++;
      }
    }
  }
  return mask;
}
