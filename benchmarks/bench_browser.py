"""In-browser decoder latency: the exported decoder graph run by onnxruntime-web in headless Chromium.

Exports the decoder of a checkpoint four ways and times one click (a foreground point plus the
padding point, no mask input) with each, with 1 and 2 WebAssembly threads:

  faithful   ``export_decoder(model)``: the reference computation, all 4 masks upscaled in the graph;
  fast       ``export_decoder(model, fast=True)``: the same function with the fast decoder arithmetic;
  fast+js    ``export_decoder(model, fast=True, upscale_masks=False)``, the graph the labelling app
             loads: low-res logits from the graph, the best candidate upscaled by the app's own
             JavaScript (``static/masks.js``), included in the time (the app upscales the other two
             only when the user cycles to them).
  cache+js   ``export_decoder(model, fast=True, upscale_masks=False, image_cache=True)`` with the
             per-image graph of ``export_decoder_cache(model)`` (the first block's image projections,
             run once per image and timed on its own in the ``cache`` row), upscaled as fast+js.
  cache:tf   the cache+js decoder graph stopped after the two-way transformer (the upscaling network
             replaced by a tiny stand-in): with cache+js, the time split between the transformer and
             the upscaling (network and JavaScript).
  approx+js  what the labelling app runs for a first click on an object by default (``anyseg serve
             --page-graph approximate``, ``anyseg.server.page_decoder``): the low-rank graph of
             ``anyseg.export.page_graph`` (no mask inputs, the three candidates only, float32 but the
             upscaling's second product in int8 and its GELUs in tanh form), with its per-image tensors
             from the page's per-image graph, upscaling the image's tokens only (``upscale_grid``, as
             the page asks; the page then computes the whole low-res map in the background, for a
             refining click, which is not timed here). ``cache+js`` is the ``exact`` setting's graph
             with the mask inputs.
  approx:dense the first-click graph the approximate setting used before the low-rank one, for
             comparison: cache+js without the mask inputs, three candidates, the upscaling's two
             products in int8 (it forms the 4096 x 256 image tokens of each block per click).
  approx:mask the approximate graph with the mask inputs, which the page runs for a refining click:
             the low-rank graph with the mask prompt's terms (timed here with has_mask_input 0, the
             same work), upscaling the image's tokens.

The ``cache`` row times the per-image graph of cache+js (the exact setting's, run once per image);
``approx:cache`` the approximate setting's (the low-rank graphs' per-image tensors).

With a golden checkpoint (the default), the approximate graphs are also run in the page on the golden
image embeddings and every golden predictor prompt (the first-click graph for prompts without a mask
prompt, the other for those with one, as the page does), and their candidates (upscaled as the page
does) are compared with the server's float32 decode of the same prompt: the worst and mean mask IoU
are printed under the table.

The graphs are served with the page's onnxruntime-web files from a local HTTP server that sends the
cross-origin-isolation headers (WebAssembly threads need them). Native onnxruntime (Python) on the
same graphs is timed alongside (graph only).

Prints a table (median and best of the repeats, milliseconds). Timings are wall-clock on whatever else
the machine is doing; run it on an idle machine for clean numbers.

Needs the browser test set-up: ``make install-test`` (Playwright, Debian's chromium, and the
onnxruntime-web files copied by ``make web``).

usage:
  ANYSEG_SHARED=../shared python benchmarks/bench_browser.py [--checkpoint PATH] [--size 534x800]
      [--repeats 20] [--threads 1,2] [--workdir DIR] [--graphs approx+js,cache+js]
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
ORT_DIR = REPO / "anyseg" / "server" / "static" / "ort"
CHROMIUM = os.environ.get("ANYSEG_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

PAGE = "<!doctype html><meta charset='utf-8'><title>decoder benchmark</title><p>decoder benchmark</p>"

# Runs in the page: load onnxruntime-web with `threads` threads, then time each graph.
BENCH_JS = """async ({graphs, threads, repeats, height, width, side, grid, dim}) => {
  const ort = await import('./ort/ort.wasm.min.mjs');
  const { upscaleLogits } = await import('./masks.js');
  ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;
  ort.env.wasm.numThreads = threads;
  let seed = 1;
  const rand = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
  const emb = new Float32Array(dim * grid * grid);
  for (let i = 0; i < emb.length; i++) emb[i] = 2 * rand() - 1;
  const scale = side / Math.max(height, width);
  const inputH = Math.floor(height * scale + 0.5), inputW = Math.floor(width * scale + 0.5);
  const { upscaleGrid } = await import('./decoders.js');
  const crop = upscaleGrid([inputH, inputW], side, grid);  // as the page: the image's tokens only
  const results = {isolated: self.crossOriginIsolated, graphs: {}, caches: {}};
  const load = async (file) => ort.InferenceSession.create(await (await fetch(file)).arrayBuffer(),
                                                           {executionProviders: ['wasm']});
  for (const {file, cache} of graphs) {
    const session = await load(file);
    let projections = {};
    if (cache) {
      // The per-image graph: run once per image (timed on its own, several times to warm up).
      const cacheSession = await load(cache);
      const cacheTimes = [];
      for (let r = 0; r < 5; r++) {
        const t0 = performance.now();
        projections = await cacheSession.run({image_embeddings: new ort.Tensor('float32', emb, [1, dim, grid, grid])});
        cacheTimes.push(performance.now() - t0);
      }
      results.caches[file] = cacheTimes.slice(2);
      await cacheSession.release();
    }
    const times = [];
    for (let r = 0; r < repeats + 10; r++) {
      const feeds = {
        image_embeddings: new ort.Tensor('float32', emb, [1, dim, grid, grid]),
        point_coords: new ort.Tensor('float32', Float32Array.from([rand() * width * scale, rand() * height * scale, 0, 0]), [1, 2, 2]),
        point_labels: new ort.Tensor('float32', Float32Array.from([1, -1]), [1, 2]),
        mask_input: new ort.Tensor('float32', new Float32Array(4 * grid * 4 * grid), [1, 1, 4 * grid, 4 * grid]),
        has_mask_input: new ort.Tensor('float32', Float32Array.from([0]), [1]),
        orig_im_size: new ort.Tensor('float32', Float32Array.from([height, width]), [2]),
        upscale_grid: new ort.Tensor('float32', new Float32Array(crop[0] * crop[1]), crop),
        ...projections,
      };
      for (const key of Object.keys(feeds)) if (!session.inputNames.includes(key)) delete feeds[key];
      const t0 = performance.now();
      const out = await session.run(feeds);
      if (out.low_res_masks && out.low_res_masks.dims[2] < 4 * grid) {
        // the transformer-only graph: nothing to upscale
      } else if (out.masks) {
        if (out.masks.dims[2] !== height || out.masks.dims[3] !== width) throw new Error('unexpected mask size');
      } else {
        // As the app does: the best of the three candidates is upscaled at once, the others on demand.
        const low = out.low_res_masks, iou = out.iou_predictions.data;
        const picks = low.dims[1] === 4 ? [1, 2, 3] : [0, 1, 2];
        const best = picks.reduce((a, b) => (iou[b] > iou[a] ? b : a));
        const [h, w] = [low.dims[2], low.dims[3]];
        let map = low.data.subarray(best * h * w, (best + 1) * h * w);
        if (h < 4 * grid || w < 4 * grid) {  // a cropped output, placed in the whole map as the page does
          const whole = new Float32Array(16 * grid * grid).fill(-1e4);
          for (let r = 0; r < h; r++) whole.set(map.subarray(r * w, (r + 1) * w), r * 4 * grid);
          map = whole;
        }
        upscaleLogits(map, 4 * grid, side, inputH, inputW, height, width);
      }
      const ms = performance.now() - t0;
      if (r >= 10) times.push(ms);  // the first runs warm up (WebAssembly code is optimised while it runs)
    }
    await session.release();
    results.graphs[file] = times;
  }
  return results;
}"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args):  # keep the table readable
        pass


def _native(path: Path, threads: int, repeats: int, height: int, width: int, side: int, grid: int, dim: int,
            cache: "Path | None" = None):
    """Milliseconds per click of graph ``path`` in native onnxruntime; with ``cache`` (the per-image graph)
    also the times of that graph, run once per image: ``(click_times, cache_times)``."""
    import numpy as np
    import onnxruntime as ort

    from anyseg.export.page_graph import upscale_grid

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    emb = rng.uniform(-1, 1, (1, dim, grid, grid)).astype(np.float32)
    projections, cache_times = {}, []
    if cache is not None:
        cache_session = ort.InferenceSession(str(cache), options, providers=["CPUExecutionProvider"])
        for r in range(5):
            start = time.perf_counter()
            out = cache_session.run(None, {"image_embeddings": emb})
            cache_times.append((time.perf_counter() - start) * 1000.0)
        projections = dict(zip((o.name for o in cache_session.get_outputs()), out))
        cache_times = cache_times[2:]
    scale = side / max(height, width)
    crop = upscale_grid((int(height * scale + 0.5), int(width * scale + 0.5)), side, grid)
    times = []
    for r in range(repeats + 3):
        feeds = {
            "image_embeddings": emb,
            "point_coords": np.array([[[rng.uniform(0, width * scale), rng.uniform(0, height * scale)], [0, 0]]],
                                     np.float32),
            "point_labels": np.array([[1, -1]], np.float32),
            "mask_input": np.zeros((1, 1, 4 * grid, 4 * grid), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([height, width], np.float32),
            "upscale_grid": np.zeros(crop, np.float32),
            **projections,
        }
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        start = time.perf_counter()
        session.run(None, feeds)
        if r >= 3:
            times.append((time.perf_counter() - start) * 1000.0)
    return times, cache_times


# Runs in the page: the approximate graph on golden embeddings and prompts; low-res logits back as base64.
QUALITY_JS = """async ({decoder, nomask, cache, images}) => {
  const ort = await import('./ort/ort.wasm.min.mjs');
  const load = async (file) => ort.InferenceSession.create(await (await fetch(file)).arrayBuffer(),
                                                           {executionProviders: ['wasm']});
  const floats = async (file) => new Float32Array(await (await fetch(file)).arrayBuffer());
  const b64 = (a) => { const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let t = '';
    for (let i = 0; i < u.length; i += 0x8000) t += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
    return btoa(t); };
  const [session, nomaskSession, cacheSession] = [await load(decoder), await load(nomask), await load(cache)];
  const out = [];
  for (const image of images) {
    const emb = await floats(image.embedding);
    const projections = await cacheSession.run({image_embeddings: new ort.Tensor('float32', emb, image.shape)});
    const refine = await floats(image.refine);
    for (const p of image.prompts) {
      const n = p.labels.length;
      // As the page: the first-click graph for a prompt without a mask prompt, each graph fed what it names.
      const s = p.mask ? session : nomaskSession;
      const feeds = {...projections,
        point_coords: new ort.Tensor('float32', Float32Array.from(p.coords.flat()), [1, n, 2]),
        point_labels: new ort.Tensor('float32', Float32Array.from(p.labels), [1, n]),
        mask_input: new ort.Tensor('float32', p.mask ? refine : new Float32Array(refine.length), [1, 1, 256, 256]),
        has_mask_input: new ort.Tensor('float32', Float32Array.from([p.mask ? 1 : 0]), [1]),
        upscale_grid: new ort.Tensor('float32', new Float32Array(image.crop[0] * image.crop[1]), image.crop)};
      for (const key of Object.keys(feeds)) if (!s.inputNames.includes(key)) delete feeds[key];
      const r = await s.run(feeds);
      out.push({low: b64(r.low_res_masks.data), dims: r.low_res_masks.dims, scores: Array.from(r.iou_predictions.data)});
    }
  }
  await session.release(); await nomaskSession.release(); await cacheSession.release();
  return out;
}"""


def _page_quality(page, work: Path, model, checkpoint: Path, shared: Path):
    """Worst and mean mask IoU of the approximate graph, run in ``page``, against the float32 decode
    (``SamPredictor`` on the same embedding) over every golden predictor prompt of ``checkpoint``; None
    when the checkpoint has no golden cases."""
    import base64
    import json

    import numpy as np
    import torch

    import anyseg
    from anyseg.export.page_graph import upscale_grid
    from anyseg.geometry import boxes_to_model, coords_to_model

    golden = shared / "golden"
    try:
        manifest = json.loads((golden / "manifest.json").read_text())
    except OSError:
        return None
    entry = next((e for e in manifest.values() if isinstance(e, dict) and e.get("checkpoint") == checkpoint.name), None)
    if entry is None or checkpoint.resolve().parent != golden.resolve():
        return None
    predictor = anyseg.SamPredictor(model)
    images, wanted = [], []
    for i, spec in enumerate(entry["predictor"]):
        data = np.load(golden / spec["file"])
        emb = data["image_embedding"].astype(np.float32)
        size, input_size = tuple(int(v) for v in data["original_size"]), tuple(int(v) for v in data["input_size"])
        (work / f"golden-{i}.bin").write_bytes(emb.tobytes())
        (work / f"golden-{i}-refine.bin").write_bytes(data["refine_mask_input"].astype(np.float32).tobytes())
        predictor.set_embedding(torch.from_numpy(emb), input_size, size)
        prompts = []
        for case in spec["cases"]:
            boxes = case.get("boxes") or [case["box"]]
            for box in boxes:
                points = None if "boxes" in case else case["point_coords"]
                labels = None if "boxes" in case else case["point_labels"]
                uses_mask = "mask_input" in case
                want, scores, _ = predictor.predict(
                    None if points is None else np.array(points), None if labels is None else np.array(labels),
                    None if box is None else np.array(box), multimask_output=True,
                    mask_input=data["refine_mask_input"] if uses_mask else None)
                wanted.append((want, scores, input_size, size))
                coords, codes = [], []
                if points:
                    coords += coords_to_model(np.array(points, np.float64), size).tolist()
                    codes += list(labels)
                if box is not None:
                    coords += boxes_to_model(np.array(box, np.float64), size).reshape(2, 2).tolist()
                    codes += [2, 3]
                else:
                    coords.append([0.0, 0.0])
                    codes.append(-1)
                prompts.append(dict(coords=coords, labels=codes, mask=uses_mask))
        images.append(dict(embedding=f"golden-{i}.bin", refine=f"golden-{i}-refine.bin", shape=list(emb.shape),
                           prompts=prompts, crop=list(upscale_grid(input_size, model.img_size, emb.shape[-1]))))
    results = page.evaluate(QUALITY_JS, dict(decoder="decoder-page-approximate.onnx",
                                             nomask="decoder-page-approximate-nomask.onnx",
                                             cache="decoder-cache.onnx", images=images))
    ious, score_err = [], 0.0
    for (want, scores, input_size, size), got in zip(wanted, results):
        part = np.frombuffer(base64.b64decode(got["low"]), np.float32).reshape(got["dims"])
        low = np.full(part.shape[:2] + (4 * int(model.config.embedding_size),) * 2, -1e4, np.float32)  # a cropped output in place
        low[..., : part.shape[2], : part.shape[3]] = part
        masks = model.postprocess_masks(torch.from_numpy(low.copy()), input_size, size)[0].numpy() > 0
        score_err = max(score_err, float(np.abs(np.array(got["scores"]) - scores).max()))
        for a, b in zip(masks, want):
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    return dict(prompts=len(wanted), worst=min(ious), mean=float(np.mean(ious)), score_err=score_err)


def _transformer_only(self, mask_tokens, image_tokens, which):
    """Stands in for ``FastDecoder.masks`` in the cache:tf graph: ``B x k x 1 x 1``, a value that depends
    on the transformer's outputs (so that the graph keeps all of it) without any upscaling."""
    return (mask_tokens[:, list(which), :1] + image_tokens[:, :1, :1]).unsqueeze(-1)


def main(argv=None) -> int:
    shared = Path(os.environ.get("ANYSEG_SHARED", REPO.parent / "shared"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(shared / "golden" / "mobilesam_checkpoint.pth"))
    parser.add_argument("--size", default="534x800", help="original image size HxW (default: 534x800)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", default="1,2", help="comma-separated WebAssembly thread counts")
    parser.add_argument("--workdir", default=None, help="where to write the graphs (default: a temp dir)")
    parser.add_argument("--graphs", default=None, help="comma-separated graph kinds to time (default: all)")
    args = parser.parse_args(argv)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error("--size must look like 534x800 and --threads like 1,2")
    if not (ORT_DIR / "ort.wasm.min.mjs").is_file():
        print(f"onnxruntime-web is missing from {ORT_DIR}: run `make web` (or `make install-test`)", file=sys.stderr)
        return 2
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        print(f"Chromium not found at {CHROMIUM} (set ANYSEG_CHROMIUM or run `make install-test`)", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("Playwright is not installed: pip install playwright (or `make install-test`)", file=sys.stderr)
        return 2

    import torch

    import anyseg
    from anyseg.export import export_decoder, export_decoder_cache
    from anyseg.fast.decoder import FastDecoder
    from anyseg.server.page_decoder import SamPageGraphs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="anyseg-bench-browser-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ORT_DIR, work / "ort", dirs_exist_ok=True)
    for name in ("masks.js", "decoders.js", "api.js"):  # the page modules the benchmark imports
        shutil.copy(ORT_DIR.parent / name, work / name)
    (work / "index.html").write_text(PAGE, encoding="utf-8")
    model = anyseg.load_model(args.checkpoint, device="cpu")
    # kind -> (decoder graph, per-image graph or None)
    graphs = {"faithful": ("decoder.onnx", None), "fast": ("decoder-fast.onnx", None),
              "fast+js": ("decoder-fast-lowres.onnx", None),
              "cache+js": ("decoder-fast-lowres-cached.onnx", "decoder-cache-dense.onnx"),
              "cache:tf": ("decoder-transformer-only.onnx", "decoder-cache-dense.onnx"),
              "approx+js": ("decoder-page-approximate-nomask.onnx", "decoder-cache.onnx"),
              "approx:dense": ("decoder-page-dense-nomask.onnx", "decoder-cache-dense.onnx"),
              "approx:mask": ("decoder-page-approximate.onnx", "decoder-cache.onnx")}
    if args.graphs:
        wanted = args.graphs.split(",")
        unknown = set(wanted) - set(graphs)
        if unknown:
            parser.error(f"unknown graph kinds {sorted(unknown)}; known: {', '.join(graphs)}")
        graphs = {k: v for k, v in graphs.items() if k in wanted}
    with torch.no_grad():
        if "cache:tf" in graphs:
            with mock.patch.object(FastDecoder, "masks", _transformer_only):
                export_decoder(model, work / graphs["cache:tf"][0], fast=True, upscale_masks=False, image_cache=True)
        exports = {"faithful": dict(), "fast": dict(fast=True), "fast+js": dict(fast=True, upscale_masks=False),
                   "cache+js": dict(fast=True, upscale_masks=False, image_cache=True)}
        for kind, options in exports.items():
            if kind in graphs:
                export_decoder(model, work / graphs[kind][0], **options)
        SamPageGraphs.export(model, work / "decoder-page-approximate.onnx", work / "decoder-cache.onnx", "approximate",
                             work / "decoder-page-approximate-nomask.onnx")
        export_decoder_cache(model, work / "decoder-cache-dense.onnx")  # the exact setting's per-image graph
        if "approx:dense" in graphs:
            from anyseg.export.quantize import quantize_upscaling

            plain = work / "decoder-page-dense-nomask-float32.onnx"
            export_decoder(model, plain, fast=True, upscale_masks=False, image_cache=True, multimask_only=True,
                           mask_prompt=False, opset=17)
            quantize_upscaling(plain, work / graphs["approx:dense"][0])
    dims = dict(height=height, width=width, side=int(model.img_size), grid=int(model.config.embedding_size),
                dim=int(model.prompt_encoder.embed_dim))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(work)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    rows, quality = [], None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            for threads in thread_counts:
                page = browser.new_page()  # a fresh page per thread count: the wasm runtime starts once per page
                page.goto(url)
                specs = [dict(file=f, cache=c) for f, c in graphs.values()]
                result = page.evaluate(BENCH_JS, dict(graphs=specs, threads=threads, repeats=args.repeats, **dims))
                if threads > 1 and not result["isolated"]:
                    print("warning: the page is not cross-origin isolated, so WebAssembly ran single-threaded",
                          file=sys.stderr)
                for kind, (name, cache) in graphs.items():
                    rows.append(("onnxruntime-web (wasm)", kind, threads, result["graphs"][name]))
                    if kind == "cache+js":
                        rows.append(("onnxruntime-web (wasm)", "cache", threads, result["caches"][name]))
                    if kind == "approx+js":
                        rows.append(("onnxruntime-web (wasm)", "approx:cache", threads, result["caches"][name]))
                if threads == thread_counts[-1]:
                    quality = _page_quality(page, work, model, Path(args.checkpoint), shared)
                page.close()
            browser.close()
    finally:
        server.shutdown()
    for threads in thread_counts:
        for kind, (name, cache) in graphs.items():
            clicks, cache_times = _native(work / name, threads, args.repeats, **dims,
                                          cache=None if cache is None else work / cache)
            rows.append(("onnxruntime (native)", kind, threads, clicks))
            if kind == "cache+js":
                rows.append(("onnxruntime (native)", "cache", threads, cache_times))
            if kind == "approx+js":
                rows.append(("onnxruntime (native)", "approx:cache", threads, cache_times))

    print(f"\ndecoder, one click, masks at {height}x{width}: {Path(args.checkpoint).name}, "
          f"{args.repeats} repeats, {os.cpu_count()} CPUs")
    print(f"{'runtime':<24} {'graph':<12} {'threads':>7} {'median ms':>10} {'best ms':>8}")
    for runtime, kind, threads, times in rows:
        print(f"{runtime:<24} {kind:<12} {threads:>7} {statistics.median(times):>10.1f} {min(times):>8.1f}")
    if quality:
        print(f"\nthe approximate graphs against the server's float32 decode ({quality['prompts']} golden prompts, 3 candidates "
              f"each, run in the page): mask IoU worst {quality['worst']:.4f}, mean {quality['mean']:.4f}; "
              f"scores within {quality['score_err']:.1e}")
    else:
        print("\n(no golden predictor cases for this checkpoint: the approximate graph's IoU is not measured)")
    print(f"\ngraphs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
