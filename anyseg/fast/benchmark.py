"""Speed benchmark: faithful vs fast paths for encode, one click and segment everything, plus the
quality of each fast path against the faithful one (used by ``benchmarks/bench_speed.py`` and
``anyseg bench``).

Speed rows use randomly initialised ``vit_b`` / ``vit_t`` models built from ``anyseg.config.VARIANTS``
(run time does not depend on weight values) on an 800 x 534 image; quality rows use the golden
checkpoints and images when the shared reference data is available.

Columns: ``wall`` (best wall-clock seconds over the repeats), ``cpu`` (process CPU seconds of that
repeat, all threads: less sensitive to other load on the machine than wall time), ``faults`` (the
process's minor page faults in that repeat, where the platform counts them: memory the kernel had to
hand out afresh), ``speedup`` (faithful wall / this wall, measured in the same process), throughput, and
peak memory (resident set size sampled during the row, or CUDA max allocated on a GPU).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..speed import SpeedConfig, apply, cpu_capabilities, keep_freed_memory

TASKS = ("encode_vit_b", "encode_vit_t", "click", "amg", "amg_keepall", "quality")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak RSS (sampled every 5 ms) or CUDA max allocated, over a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak = _rss_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def _minor_faults() -> Optional[int]:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> Dict[str, Any]:
    fn = torch.inference_mode()(fn)  # as the predictor runs: no autograd graph, no saved activations
    for _ in range(warmup):
        fn()
    best = None
    with PeakMemory(device) as mem:
        for _ in range(max(1, repeats)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            w0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu, f1 = time.perf_counter() - w0, time.process_time() - c0, _minor_faults()
            if best is None or wall < best[0]:
                best = (wall, cpu, None if f0 is None else f1 - f0)
    return {"wall": best[0], "cpu": best[1], "faults": best[2], "peak_bytes": mem.peak}


def speed_configs(device: torch.device, all_dtypes: bool = False, compile: bool = False) -> Dict[str, SpeedConfig]:
    """The configurations benchmarked on ``device`` (name -> config); ``compile`` adds ``auto`` with
    ``torch.compile`` of the image encoder."""
    configs = {"faithful": SpeedConfig.faithful(), "lossless": SpeedConfig.lossless()}
    if device.type == "cpu":
        configs["int8"] = SpeedConfig.lossless(int8_encoder=True)
        if all_dtypes or cpu_capabilities()["bf16_matmul"]:
            configs["bf16"] = SpeedConfig.lossless(encoder_dtype=torch.bfloat16)
    else:
        if torch.cuda.is_bf16_supported():
            configs["bf16"] = SpeedConfig.lossless(encoder_dtype=torch.bfloat16, decoder_dtype=torch.bfloat16)
        configs["fp16"] = SpeedConfig.lossless(encoder_dtype=torch.float16)

    configs["auto"] = SpeedConfig.auto(device)
    if compile:
        configs["compiled"] = SpeedConfig.auto(device, compile=True)
    return configs


def _random_model(variant: str, device: torch.device):
    from ..config import VARIANTS
    from ..modeling.sam import build_sam

    torch.manual_seed(0)
    return build_sam(VARIANTS[variant]).to(device).eval()


def machine_description(device: torch.device) -> str:
    caps = cpu_capabilities()
    text = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
            f"{torch.get_num_threads()}, ISA {caps['isa']}, AMX {caps['amx']}, AVX512-BF16 {caps['avx512_bf16']}, "
            f"torch {torch.__version__}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    try:
        text += f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        pass
    return text


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_speed(device: torch.device, tasks, quick: bool, image: np.ndarray, configs: Dict[str, SpeedConfig],
              amg_side: Optional[int] = None, log: Callable[[str], None] = print, encode_batch: int = 1,
              amg_model: str = "vit_t", failures: Optional[List[Dict[str, str]]] = None) -> List[Dict[str, Any]]:
    """Time every task x config; returns one row dict per measurement. A task that raises is logged,
    appended to ``failures`` and skipped.

    ``encode_batch`` > 1 times the encoder alone on that many preprocessed images at once;
    ``amg_model`` is the (randomly initialised) variant used by the segment-everything rows."""
    from ..automatic import MaskGenerator
    from ..predictor import SamPredictor
    from ..speed import encode, preprocess_image

    rows: List[Dict[str, Any]] = []
    models: Dict[str, Any] = {}

    def model(variant: str):
        if variant not in models:
            models[variant] = _random_model(variant, device)
        return models[variant]

    def add(task: str, name: str, result: Dict[str, float], work: float, unit: str) -> None:
        row = {"task": task, "config": name, "describe": configs[name].describe(), **result,
               "throughput": work / result["wall"], "unit": unit}
        base = next((r for r in rows if r["task"] == task and r["config"] == "faithful"), None)
        row["speedup"] = base["wall"] / row["wall"] if base else 1.0
        rows.append(row)
        log(f"  {task:<16} {name:<9} wall {row['wall']:.3f}s cpu {row['cpu']:.3f}s x{row['speedup']:.2f}")

    failures = [] if failures is None else failures

    def run_task(task: str) -> None:
        if task.startswith("encode_") and encode_batch > 1:
            # The encoder alone on a batch of preprocessed images (the same image repeated); per-image
            # throughput. Resizing on the CPU is left out: it is per image and does not batch.
            variant = task.split("_", 1)[1]
            m = model(variant)
            x = preprocess_image(m, image)[0].expand(encode_batch, -1, -1, -1).contiguous()
            for name, cfg in configs.items():
                apply(m, cfg)
                reps = 1 if quick else 5
                if name == "faithful":  # the reference's setting: one image at a time
                    fn = lambda: [encode(m, x[i : i + 1]) for i in range(encode_batch)]  # noqa: E731
                else:
                    fn = lambda: encode(m, x)  # noqa: E731
                res = _time(fn, device, reps, 3 if cfg.compile else 1)
                add(f"{task}_batch{encode_batch}", name, res, encode_batch, "img/s")
                rows[-1]["per_image_ms"] = 1000 * res["wall"] / encode_batch
            apply(m, SpeedConfig.faithful())
            del models[variant]
            _release(device)
        elif task.startswith("encode_"):
            variant = task.split("_", 1)[1]
            for name, cfg in configs.items():
                m = apply(model(variant), cfg)
                p = SamPredictor(m)
                slow = name == "faithful" and variant in ("vit_b", "vit_l", "vit_h") and device.type == "cpu"
                reps = 1 if quick or slow else 3
                warm = 2 if cfg.compile else 1
                add(task, name, _time(lambda: p.set_image(image), device, reps, warm), 1.0, "img/s")
            del models[variant]
            _release(device)
        elif task == "click":
            m = model("vit_t")
            for name, cfg in configs.items():
                apply(m, cfg)
                p = SamPredictor(m)
                p.set_image(image)
                pt, lb = np.array([[image.shape[1] * 0.5, image.shape[0] * 0.55]]), np.array([1])
                add(task, name, _time(lambda: p.predict(pt, lb, multimask_output=True), device,
                                      10 if quick else 30, 3), 1.0, "click/s")
        elif task in ("amg", "amg_keepall"):
            m = model(amg_model)
            side = amg_side or (16 if quick else 32)
            if task == "amg_keepall":
                side = max(4, side // 2)
                params = dict(points_per_side=side, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
            else:
                params = dict(points_per_side=side)
            for name, cfg in configs.items():
                apply(m, cfg)
                gen = MaskGenerator(m, output_mode="uncompressed_rle", **params)
                out: List[int] = []
                # On a GPU the first call pays for kernel selection and (compiled) graph building.
                warm = 1 if device.type == "cuda" or cfg.compile else 0
                res = _time(lambda: out.append(len(gen.generate(image))), device, 1 if quick else 2, warm)
                label = f"{task}_{side}x{side}" + ("" if amg_model == "vit_t" else f"_{amg_model}")
                add(label, name, res, side * side, "points/s")
                rows[-1]["n_masks"] = out[-1]
                gc.collect()

    for task in tasks:
        try:
            run_task(task)
        except Exception as exc:  # one broken row must not lose the others
            import traceback

            log(f"  {task}: FAILED ({type(exc).__name__}: {exc})")
            log(traceback.format_exc())
            failures.append({"task": task, "error": f"{type(exc).__name__}: {exc}"})
            models.clear()
            _release(device)
    return rows


def run_quality(shared: Path, configs: Dict[str, SpeedConfig], quick: bool,
                log: Callable[[str], None] = print, device: torch.device = torch.device("cpu")) -> List[Dict[str, Any]]:
    """Fast-vs-faithful quality on the golden checkpoints: fast paths on ``device``, the faithful
    float32 reference on the CPU."""
    import json

    from ..checkpoint import load_model
    from ..imageio import load_image
    from .quality import amg_quality, faithful_amg, predictor_cases, predictor_quality

    manifest = json.loads((shared / "golden" / "manifest.json").read_text())
    images = ["dog.jpg"] if quick else ["truck.jpg", "dog.jpg"]
    rows = []
    for model_name in ("mobilesam", "vit_small"):
        entry = manifest[model_name]
        m = load_model(shared / "golden" / entry["checkpoint"], device="cpu")
        fast_model = m if device.type == "cpu" else load_model(shared / "golden" / entry["checkpoint"], device=device)
        imgs = [load_image(shared / "images" / i) for i in images]
        cases = [predictor_cases(entry, i) for i in images]
        amg_image = load_image(shared / "images" / "groceries.jpg")
        amg_params = entry["amg"][0]["params"]
        amg_reference = faithful_amg(m, amg_image, amg_params)
        reference = None if fast_model is m else m
        for name, cfg in configs.items():
            if (name == "faithful" and device.type == "cpu") or cfg.compile:
                continue
            pq = predictor_quality(fast_model, cfg, imgs, cases, reference=reference)
            aq = amg_quality(fast_model, cfg, amg_image, amg_params, reference_records=amg_reference)
            rows.append({"model": model_name, "config": name, "min_mask_iou": pq["min_iou"],
                         "worst_case": min(pq["per_case"], key=pq["per_case"].get),
                         "max_score_err": pq["max_score_err"], **aq})
            log(f"  quality {model_name:<9} {name:<9} min IoU {pq['min_iou']:.4f} AMG matched "
                f"{aq['fast_in_faithful']:.3f}/{aq['faithful_in_fast']:.3f}")
    return rows


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f}"


def format_tables(meta: Dict[str, Any], rows: List[Dict[str, Any]], quality: List[Dict[str, Any]]) -> str:
    """Markdown tables of the speed and quality rows."""
    lines = [f"Measured {meta['date']} on {meta['machine']} ({meta['device']}).", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    for failure in meta.get("failures", []):
        lines += [f"**{failure['task']} failed**: {failure['error']}", ""]
    mem = "peak CUDA alloc (MB)" if meta["device"].startswith("cuda") else "peak RSS (MB)"
    if any(r["task"].startswith("sam3_") for r in rows):
        lines += ["SAM 3 rows: medians, configurations alternating within each repeat (best wall time in "
                  "parentheses); speedup against `reference` (SDPA attention, the text encoded for every prompt, "
                  "as the reference code). Per-phrase rows: segment(text=...) on an encoded image, masks at the "
                  "image size.", ""]
    if any("wall_min" in r and not r["task"].startswith("sam3_") for r in rows):
        n = max(r.get("median_of", 1) for r in rows if "wall_min" in r)
        lines += [f"SAM 2 rows: median of up to {n} repeats with the configurations alternating within each "
                  "repeat (best wall time in parentheses); model in the task column. Their speedup is against "
                  "the `reference` row (what the reference code computes: float32, attention through "
                  "scaled_dot_product_attention); `faithful` is anyseg's reference path (explicit softmax "
                  "attention in Hiera and the decoder).", ""]
    if rows:
        lines += [f"| task | config | wall (s) | CPU (s) | page faults | speedup | throughput | {mem} | fast paths |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        extra = f" ({r['n_masks']} masks)" if "n_masks" in r else ""
        if "per_image_ms" in r:
            extra = f" ({r['per_image_ms']:.1f} ms/img)"
        if "model" in r:
            extra += f" [{r['model']}]"
        faults = "-" if r.get("faults") is None else str(r["faults"])
        wall = f"{r['wall']:.3f}" + (f" ({r['wall_min']:.3f})" if "wall_min" in r else "")
        lines.append(f"| {r['task']}{extra} | {r['config']} | {wall} | {r['cpu']:.3f} | {faults} | "
                     f"{r['speedup']:.2f}x | {r['throughput']:.2f} {r['unit']} | {_mb(r['peak_bytes'])} | {r['describe']} |")
    if quality:
        lines += ([""] if rows else []) + ["| model | config | min mask IoU vs faithful (worst case) | max IoU-score error | "
                      "AMG fast matched in faithful | AMG faithful matched in fast |",
                  "|---|---|---:|---:|---:|---:|"]
        for q in quality:
            amg = ["-", "-"]
            if "fast_in_faithful" in q:
                amg = [f"{q['fast_in_faithful']:.3f} ({q['n_fast']})", f"{q['faithful_in_fast']:.3f} ({q['n_faithful']})"]
            lines.append(f"| {q['model']} | {q['config']} | {q['min_mask_iou']:.4f} ({q['worst_case']}) | "
                         f"{q['max_score_err']:.2e} | {amg[0]} | {amg[1]} |")
    return "\n".join(lines)


def run_benchmark(tasks=TASKS, quick: bool = False, devices: Optional[List[str]] = None,
                  image_path: Optional[Path] = None, shared: Optional[Path] = None, all_dtypes: bool = False,
                  amg_side: Optional[int] = None, note: str = "", log: Callable[[str], None] = print,
                  encode_batch: Optional[int] = None, amg_model: Optional[str] = None,
                  compile: bool = False, only_configs: Optional[List[str]] = None,
                  sam2_model_spec: Optional[str] = None, sam2_random_weights: Optional[bool] = None,
                  repeats: Optional[int] = None, sam3_model_spec: Optional[str] = None) -> Dict[str, Any]:
    """Run the benchmark and return ``{"meta", "rows", "quality", "markdown"}`` per device.

    ``encode_batch`` / ``amg_model`` default to 1 / ``vit_t`` on a CPU and 8 / ``vit_h`` on a GPU (the
    settings of the reference measurements). The ``sam2_*`` tasks time ``sam2_model_spec`` (a checkpoint
    file or a public SAM 2 name; default ``sam2.1_hiera_t`` with random weights, see :func:`sam2_model`)
    with ``repeats`` alternated repeats (default by task)."""
    from ..imageio import load_image

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if image_path is None and shared is not None and (shared / "images" / "dog.jpg").exists():
        image_path = shared / "images" / "dog.jpg"
    if image_path is not None:
        image = load_image(image_path)
    else:  # a synthetic 800 x 534 image (speed does not depend on content much)
        rng = np.random.default_rng(0)
        image = (rng.random((534, 800, 3)) * 255).astype(np.uint8)
    results = []
    for dev in devices:
        device = torch.device(dev)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available")
        configs = speed_configs(device, all_dtypes, compile)
        if only_configs:
            unknown = sorted(set(only_configs) - set(configs) - set(sam2_speed_configs(device, all_dtypes)))
            if unknown:
                raise ValueError(f"unknown config(s) {', '.join(unknown)} on {device}; expected some of "
                                 f"{', '.join(configs)}")
            configs = {k: v for k, v in configs.items() if k in only_configs}
        gpu = device.type == "cuda"
        # keep_freed_memory is process-wide and cannot be undone: set it before the first row when any
        # configuration asks for it, so every row (faithful ones too) runs with the same allocator.
        tuned = (device.type == "cpu" and any(c.keep_freed_memory for c in configs.values())
                 and keep_freed_memory())
        batch = encode_batch or (8 if gpu else 1)
        amg_variant = amg_model or ("vit_h" if gpu else "vit_t")
        machine = machine_description(device) + (", glibc allocator keeps freed memory (all rows)" if tuned else "")
        meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine,
                "device": str(device), "quick": quick, "note": note,
                "image": f"{image.shape[1]}x{image.shape[0]}"}
        log(f"== {meta['machine']} [{dev}]")
        speed_tasks = [t for t in tasks if t != "quality" and not t.startswith(("sam2_", "sam3_"))]
        failures: List[Dict[str, str]] = []
        rows = run_speed(device, speed_tasks, quick, image, configs, amg_side, log, batch, amg_variant, failures)
        quality = []
        if "quality" in tasks:
            if shared is None or not (shared / "golden" / "manifest.json").exists():
                log("  quality skipped: golden data not found (set ANYSEG_SHARED or --shared)")
            else:
                quality = run_quality(shared, configs, quick, log, device)
        if any(t.startswith("sam2_") for t in tasks):
            configs2 = sam2_speed_configs(device, all_dtypes)
            if only_configs:
                configs2 = {k: v for k, v in configs2.items() if k in only_configs}
            spec = sam2_model_spec or SAM2_DEFAULT_MODEL
            random_weights = sam2_random_weights if sam2_random_weights is not None else sam2_model_spec is None
            rows += run_sam2_speed(device, tasks, quick, image, configs2, spec, random_weights, amg_side, repeats,
                                   log, failures)
            if "sam2_quality" in tasks:
                if shared is None or not (shared / "golden" / "sam2" / "manifest.json").exists():
                    log("  sam2 quality skipped: golden SAM 2 data not found (set ANYSEG_SHARED or --shared)")
                else:
                    quality += run_sam2_quality(shared, {k: v for k, v in configs2.items() if k != SAM2_REFERENCE},
                                                quick, log, device)
        if any(t.startswith("sam3_") for t in tasks):
            spec = sam3_model_spec or (shared / "golden" / "sam3" / "sam3_checkpoint.pt" if shared else None)
            if spec is None or not Path(spec).exists() and not str(spec).startswith("sam3"):
                log("  sam3 rows skipped: no SAM 3 model (give --sam3-model, or the golden data via --shared)")
                failures.append({"task": "sam3", "error": "skipped: no SAM 3 model"})
            else:
                sam3_rows, sam3_quality = run_sam3(device, tasks, quick, image, spec, repeats, log, failures)
                rows += sam3_rows
                quality += sam3_quality
        meta["failures"] = failures
        results.append({"meta": meta, "rows": rows, "quality": quality,
                        "markdown": format_tables(meta, rows, quality)})
    return {"results": results}


# ------------------------------------------------------------------------------------------- SAM 2
SAM2_TASKS = ("sam2_encode", "sam2_click", "sam2_amg", "sam2_quality")
SAM2_DEFAULT_MODEL = "sam2.1_hiera_t"
# The configuration that times what the reference code computes: faithful, attention fused (SDPA).
SAM2_REFERENCE = "reference"
SAM2_REFERENCE_DESCRIBE = "reference code's computation: float32, attention through scaled_dot_product_attention"


def sam2_speed_configs(device: torch.device, all_dtypes: bool = False) -> Dict[str, SpeedConfig]:
    """The configurations of the SAM 2 rows: faithful, ``reference`` (the faithful float32 computation with
    every attention through ``scaled_dot_product_attention``, as the reference code runs it: the base of
    the speed-ups), lossless, a bfloat16 trunk where the CPU has native bfloat16 (or ``all_dtypes``) / a
    float16 trunk on a GPU, and auto."""
    configs = {"faithful": SpeedConfig.faithful(), SAM2_REFERENCE: SpeedConfig.faithful(),
               "lossless": SpeedConfig.lossless()}
    if device.type == "cpu":
        if all_dtypes or cpu_capabilities()["bf16_matmul"]:
            configs["bf16"] = SpeedConfig.lossless(encoder_dtype=torch.bfloat16)
    else:
        configs["fp16"] = SpeedConfig.lossless(encoder_dtype=torch.float16, encoder_cast=True)
    configs["auto"] = SpeedConfig.auto(device)
    return configs


def sam2_model(spec: str, device: torch.device, random_weights: bool = False):
    """A SAM 2 model for the speed rows: ``spec`` a checkpoint file (its weights), or a public name
    (``sam2.1_hiera_t``, ``sam2_hiera_b+``, ...): with ``random_weights`` built from that configuration
    with random weights (seed 0; the zero-initialised embeddings perturbed as the golden model's are),
    else loaded through :func:`anyseg.load_model` (the local cache, see ``anyseg.hub``). Speed does not
    depend on the weights."""
    from ..config_sam2 import SAM2_VARIANTS
    from ..modeling.sam2 import build_sam2_model

    path = Path(spec)
    if path.is_file():
        if random_weights:
            raise ValueError(f"--random-weights takes a public SAM 2 name ({', '.join(SAM2_VARIANTS)}), not a file")
        from ..checkpoint import load_model

        return load_model(path, device=device)
    if spec not in SAM2_VARIANTS:
        raise ValueError(f"unknown SAM 2 model {spec!r}: give a checkpoint file or one of {', '.join(SAM2_VARIANTS)}")
    if not random_weights:
        from ..checkpoint import load_model

        return load_model(spec, device=device)
    torch.manual_seed(0)
    model = build_sam2_model(SAM2_VARIANTS[spec]).eval()
    with torch.no_grad():
        trunk = model.image_encoder.trunk
        for p in (trunk.pos_embed, trunk.pos_embed_window, model.no_mem_embed):
            p.normal_(0.0, 0.3)
    return model.to(device)


class _SpeedStates:
    """:func:`anyseg.speed.apply` once per configuration, then switch between them cheaply (the kept
    runtimes, packed weights and fused flags), so that configurations can alternate repeat by repeat."""

    def __init__(self, model, configs: Dict[str, SpeedConfig], fused: Sequence[str] = ()) -> None:
        """``fused``: configurations that also run every attention module fused (``reference``)."""
        self.model = model
        self.states: Dict[str, tuple] = {}
        self._flagged = [m for m in model.modules() if hasattr(m, "fused")]
        for name, config in configs.items():
            apply(model, config)
            flags = [True if name in fused else m.fused for m in self._flagged]
            self.states[name] = (getattr(model, "speed_config", None), getattr(model, "speed_runtime", None), flags)

    def use(self, name: str) -> None:
        config, runtime, flags = self.states[name]
        self.model.speed_config, self.model.speed_runtime = config, runtime
        for module, flag in zip(self._flagged, flags):
            module.fused = flag

    def close(self) -> None:
        apply(self.model, SpeedConfig.faithful())


def _alternate(fns: Dict[str, Callable[[], Any]], switch: Callable[[str], None], device: torch.device,
               repeats: int, warmup: int, memory: bool) -> Dict[str, Dict[str, Any]]:
    """Time each ``fns[name]`` ``repeats`` times, the configurations alternating within each repeat
    (so that changes of machine load hit them alike); medians of wall and CPU time, the best wall time,
    page faults of the median repeat, and peak memory (``memory``: sampled per call)."""
    for name, fn in fns.items():
        switch(name)
        for _ in range(warmup):
            torch.inference_mode()(fn)()
    samples: Dict[str, List[tuple]] = {name: [] for name in fns}
    peaks: Dict[str, int] = {name: 0 for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            switch(name)
            fn_i = torch.inference_mode()(fn)
            if device.type == "cuda":
                torch.cuda.synchronize()
            mem = PeakMemory(device) if memory else None
            if mem is not None:
                mem.__enter__()
            w0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
            fn_i()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu, f1 = time.perf_counter() - w0, time.process_time() - c0, _minor_faults()
            if mem is not None:
                mem.__exit__(None, None, None)
                peaks[name] = max(peaks[name], mem.peak)
            samples[name].append((wall, cpu, None if f0 is None else f1 - f0))
    out = {}
    for name, rows in samples.items():
        walls = sorted(r[0] for r in rows)
        median = rows[sorted(range(len(rows)), key=lambda i: rows[i][0])[len(rows) // 2]]
        out[name] = {"wall": float(np.median(walls)), "wall_min": walls[0], "cpu": float(np.median([r[1] for r in rows])),
                     "faults": median[2], "peak_bytes": peaks[name] or _rss_bytes(), "repeats": len(rows)}
    return out


def run_sam2_speed(device: torch.device, tasks, quick: bool, image: np.ndarray, configs: Dict[str, SpeedConfig],
                   model_spec: str = SAM2_DEFAULT_MODEL, random_weights: bool = True, amg_side: Optional[int] = None,
                   repeats: Optional[int] = None, log: Callable[[str], None] = print,
                   failures: Optional[List[Dict[str, str]]] = None) -> List[Dict[str, Any]]:
    """SAM 2 rows: ``sam2_encode`` (``SAM2ImagePredictor.set_image``), ``sam2_click`` (one point, three
    masks at the image size, numpy out, as ``predict`` returns them) and ``sam2_amg``
    (``SAM2AutomaticMaskGenerator``; skipped with a note where it does not exist). Configurations
    alternate within each repeat; the rows give medians."""
    from ..sam2_predictor import SAM2ImagePredictor

    failures = [] if failures is None else failures
    rows: List[Dict[str, Any]] = []
    speed_tasks = [t for t in tasks if t in ("sam2_encode", "sam2_click", "sam2_amg")]
    if not speed_tasks:
        return rows
    model = sam2_model(model_spec, device, random_weights)
    label = Path(model_spec).stem if Path(model_spec).is_file() else model_spec
    label += " (random weights)" if random_weights else ""
    states = _SpeedStates(model, configs, fused=(SAM2_REFERENCE,))
    base_name = SAM2_REFERENCE if SAM2_REFERENCE in configs else "faithful"

    def add(task: str, name: str, result: Dict[str, Any], work: float, unit: str) -> None:
        describe = SAM2_REFERENCE_DESCRIBE if name == SAM2_REFERENCE else configs[name].describe()
        row = {"task": task, "config": name, "describe": describe, "model": label, **result,
               "throughput": work / result["wall"], "unit": unit, "median_of": result["repeats"],
               "speedup_base": base_name}
        rows.append(row)
        base = next((r for r in rows if r["task"] == task and r["config"] == base_name), None)
        for r in rows:  # rows timed before the base row get their speed-up when it arrives
            if r["task"] == task:
                r["speedup"] = base["wall"] / r["wall"] if base else 1.0
        log(f"  {task:<16} {name:<9} wall {row['wall']:.3f}s (best {row['wall_min']:.3f}) cpu {row['cpu']:.3f}s"
            + (f" x{row['speedup']:.2f} vs {base_name}" if base else ""))

    def run_task(task: str) -> None:
        if task == "sam2_encode":
            predictors = {name: SAM2ImagePredictor(model) for name in configs}
            reps = repeats or (3 if quick else 5)
            res = _alternate({n: (lambda p=p: p.set_image(image)) for n, p in predictors.items()}, states.use,
                             device, reps, 1, memory=True)
            for name in configs:
                add("sam2_encode", name, res[name], 1.0, "img/s")
        elif task == "sam2_click":
            predictors = {}
            for name in configs:
                states.use(name)
                predictors[name] = SAM2ImagePredictor(model)
                predictors[name].set_image(image)
            point, label_ = np.array([[image.shape[1] * 0.5, image.shape[0] * 0.55]]), np.array([1])
            reps = repeats or (10 if quick else 30)
            res = _alternate({n: (lambda p=p: p.predict(point, label_, multimask_output=True))
                              for n, p in predictors.items()}, states.use, device, reps, 3, memory=False)
            for name in configs:
                add("sam2_click", name, res[name], 1.0, "click/s")
        elif task == "sam2_amg":
            try:
                from ..sam2_automatic import SAM2AutomaticMaskGenerator
            except ImportError:
                log("  sam2_amg skipped: anyseg.sam2_automatic.SAM2AutomaticMaskGenerator is not available")
                failures.append({"task": task, "error": "skipped: SAM2AutomaticMaskGenerator not available"})
                return
            side = amg_side or (16 if quick else 32)
            counts: Dict[str, int] = {}

            def generate(name: str) -> Callable[[], None]:
                generator = SAM2AutomaticMaskGenerator(model, points_per_side=side, output_mode="uncompressed_rle")
                return lambda: counts.__setitem__(name, len(generator.generate(image)))

            res = _alternate({n: generate(n) for n in configs}, states.use, device, repeats or 1, 0, memory=True)
            for name in configs:
                add(f"sam2_amg_{side}x{side}", name, res[name], side * side, "points/s")
                rows[-1]["n_masks"] = counts[name]

    try:
        for task in speed_tasks:
            try:
                run_task(task)
            except Exception as exc:  # one broken row must not lose the others
                import traceback

                log(f"  {task}: FAILED ({type(exc).__name__}: {exc})")
                log(traceback.format_exc())
                failures.append({"task": task, "error": f"{type(exc).__name__}: {exc}"})
            gc.collect()
    finally:
        states.close()
    return rows


def run_sam2_quality(shared: Path, configs: Dict[str, SpeedConfig], quick: bool, log: Callable[[str], None] = print,
                     device: torch.device = torch.device("cpu")) -> List[Dict[str, Any]]:
    """Fast-vs-faithful quality on the golden SAM 2 checkpoint: min mask IoU over the manifest's
    predictor cases (truck.jpg and dog.jpg; dog.jpg with ``quick``), the largest IoU-score difference,
    and segment-everything records matched both ways (the manifest's first AMG case) where
    ``SAM2AutomaticMaskGenerator`` exists. Fast paths on ``device``, the faithful path on the CPU."""
    import json

    from ..checkpoint import load_model
    from ..imageio import load_image
    from ..sam2_predictor import SAM2ImagePredictor
    from .quality import mask_iou, match_records

    root = shared / "golden" / "sam2"
    manifest = json.loads((root / "manifest.json").read_text())
    reference = load_model(root / "sam2.1_golden.pt")
    fast_model = reference if device.type == "cpu" else load_model(root / "sam2.1_golden.pt", device=device)
    entries = [e for e in manifest["image"] if not quick or e["image"] == "dog.jpg"]

    def outputs(model, entry, image):
        golden = np.load(root / entry["file"])
        predictor = SAM2ImagePredictor(model)
        predictor.set_image(image)
        out = {}
        for case in entry["cases"]:
            kwargs = {k: (golden[v].astype(np.float32) if k == "mask_input" else
                          np.array(v) if isinstance(v, list) else v) for k, v in case["args"].items()}
            out[case["name"]] = predictor.predict(**kwargs)
        return out

    images = {e["image"]: load_image(shared / "images" / e["image"]) for e in entries}
    apply(reference, SpeedConfig.faithful())
    want = {e["image"]: outputs(reference, e, images[e["image"]]) for e in entries}
    amg = None
    try:
        from ..sam2_automatic import SAM2AutomaticMaskGenerator

        amg_case = manifest["amg"][0]
        amg_image = load_image(shared / "images" / manifest.get("amg_image", "groceries.jpg"))
        amg_params = dict(amg_case["params"], output_mode="uncompressed_rle")
        amg = (SAM2AutomaticMaskGenerator, amg_image, amg_params,
               SAM2AutomaticMaskGenerator(reference, **amg_params).generate(amg_image))
    except ImportError:
        log("  sam2 quality: SAM2AutomaticMaskGenerator not available, no segment-everything matching")
    rows = []
    for name, config in configs.items():
        if name == "faithful" and device.type == "cpu":
            continue
        apply(fast_model, config)
        per_case: Dict[str, float] = {}
        score_err = 0.0
        for entry in entries:
            got = outputs(fast_model, entry, images[entry["image"]])
            for case, (masks, scores, _) in got.items():
                masks0, scores0, _ = want[entry["image"]][case]
                flat, flat0 = masks.reshape(-1, *masks.shape[-2:]), masks0.reshape(-1, *masks0.shape[-2:])
                iou = min(mask_iou(a > 0, b > 0) for a, b in zip(flat, flat0))
                key = f"{Path(entry['image']).stem}:{case}"
                per_case[key] = min(per_case.get(key, 1.0), iou)
                score_err = max(score_err, float(np.abs(scores - scores0).max()))
        row = {"model": "sam2.1 golden", "config": name, "min_mask_iou": min(per_case.values()),
               "worst_case": min(per_case, key=per_case.get), "max_score_err": score_err}
        if amg is not None:
            generator_cls, amg_image, amg_params, ref_records = amg
            records = generator_cls(fast_model, **amg_params).generate(amg_image)
            match = match_records(records, ref_records)
            row.update(fast_in_faithful=match["a_in_b"], faithful_in_fast=match["b_in_a"], n_fast=match["n_a"],
                       n_faithful=match["n_b"])
        apply(fast_model, SpeedConfig.faithful())
        rows.append(row)
        log(f"  quality sam2.1 golden {name:<9} min IoU {row['min_mask_iou']:.4f} ({row['worst_case']})")
    return rows


# ------------------------------------------------------------------------------------------- SAM 3
SAM3_TASKS = ("sam3_encode", "sam3_phrase", "sam3_quality")
#: Phrases of the per-phrase rows (two of them are the golden data's).
SAM3_PHRASES = ("green vegetables", "red apple", "dog", "yellow school bus")
SAM3_DESCRIBE = {
    "explicit": "attention as an explicit softmax (use_sdpa=False)",
    "reference": "the reference computation: SDPA attention; the text encoder runs for every prompt",
    "lossless": "SDPA attention, text encoding cached per phrase (image features reused, as in both)",
}


def _sam3_attention(model, sdpa: bool) -> None:
    for module in model.modules():
        if hasattr(module, "use_sdpa"):
            module.use_sdpa = sdpa


def run_sam3(device: torch.device, tasks, quick: bool, image: np.ndarray, model_spec, repeats: Optional[int] = None,
             log: Callable[[str], None] = print, failures: Optional[List[Dict[str, str]]] = None):
    """SAM 3 rows -> ``(speed rows, quality rows)``. ``sam3_encode``: ``Sam3Processor.set_image`` with the
    explicit-softmax attention against the reference's SDPA; ``sam3_phrase``: one phrase on an encoded
    image (``segment(text=...)``: text, fusion encoder, decoder, masks at the image size), the
    reference encoding the text for every prompt against ``lossless`` (text cached per phrase; the
    image features are reused across prompts in both). ``sam3_quality``: the lossless and explicit
    results against the reference's on the same image and phrases. Configurations alternate within each
    repeat; the rows give medians."""
    from ..checkpoint import load_model
    from ..sam3_processor import Sam3Processor
    from .quality import mask_iou

    failures = [] if failures is None else failures
    rows: List[Dict[str, Any]] = []
    model = load_model(model_spec, device=device)
    label = "sam3 golden (reduced, random weights)" if Path(str(model_spec)).name == "sam3_checkpoint.pt" \
        else Path(str(model_spec)).stem
    phrases = SAM3_PHRASES[:2] if quick else SAM3_PHRASES

    def add(task: str, name: str, result: Dict[str, Any], work: float, unit: str) -> None:
        row = {"task": task, "config": name, "describe": SAM3_DESCRIBE[name], "model": label, **result,
               "throughput": work / result["wall"], "unit": unit, "median_of": result["repeats"],
               "speedup_base": "reference"}
        rows.append(row)
        base = next((r for r in rows if r["task"] == task and r["config"] == "reference"), None)
        for r in rows:
            if r["task"] == task:
                r["speedup"] = base["wall"] / r["wall"] if base else 1.0
        log(f"  {task:<16} {name:<9} wall {row['wall']:.3f}s (best {row['wall_min']:.3f}) cpu {row['cpu']:.3f}s")

    reference = Sam3Processor(model, resolution=model.image_size)
    lossless = Sam3Processor(model, resolution=model.image_size)

    def segment_uncached(phrase: str, state):
        reference._text_cache.clear()  # as the reference: the text encoder runs for every prompt
        return reference.segment(text=phrase, state=state)

    try:
        if "sam3_encode" in tasks:
            res = _alternate({"explicit": lambda: reference.set_image(image), "reference": lambda: reference.set_image(image)},
                             lambda name: _sam3_attention(model, name != "explicit"), device,
                             repeats or (2 if quick else 3), 1, memory=True)
            for name in ("explicit", "reference"):
                add("sam3_encode", name, res[name], 1.0, "img/s")
        _sam3_attention(model, True)
        state = reference.set_image(image)
        if "sam3_phrase" in tasks:
            for phrase in phrases:
                lossless.encode_text(phrase)  # the cache holds every phrase, as after a first image
            res = _alternate({"reference": lambda: [segment_uncached(p, state) for p in phrases],
                              "lossless": lambda: [lossless.segment(text=p, state=state) for p in phrases]},
                             lambda name: None, device, repeats or (3 if quick else 5), 1, memory=False)
            for name in ("reference", "lossless"):
                per = {**res[name], "wall": res[name]["wall"] / len(phrases),
                       "wall_min": res[name]["wall_min"] / len(phrases), "cpu": res[name]["cpu"] / len(phrases)}
                add(f"sam3_phrase (per phrase, {len(phrases)} phrases)", name, per, 1.0, "phrase/s")
    except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
        log(f"  sam3: FAILED ({type(exc).__name__}: {exc})")
        failures.append({"task": "sam3", "error": f"{type(exc).__name__}: {exc}"})
    quality: List[Dict[str, Any]] = []
    if "sam3_quality" in tasks:
        _sam3_attention(model, True)
        state = reference.set_image(image)
        want = {p: segment_uncached(p, state) for p in phrases}
        got = {"lossless": {p: lossless.segment(text=p, state=state) for p in phrases}}
        _sam3_attention(model, False)
        state = reference.set_image(image)
        got["explicit"] = {p: segment_uncached(p, state) for p in phrases}
        _sam3_attention(model, True)
        for name, results in got.items():
            per_case, score_err = {}, 0.0
            for p in phrases:
                a, b = results[p], want[p]
                if len(a) != len(b):
                    per_case[p], score_err = 0.0, float("inf")
                    continue
                per_case[p] = min([mask_iou(x, y) for x, y in zip(a.masks, b.masks)] or [1.0])
                if len(a):
                    score_err = max(score_err, float(np.abs(a.scores - b.scores).max()))
            quality.append({"model": label, "config": name, "min_mask_iou": min(per_case.values()),
                            "worst_case": min(per_case, key=per_case.get), "max_score_err": score_err,
                            "instances": sum(len(r) for r in results.values())})
            log(f"  quality sam3 {name:<9} min IoU {quality[-1]['min_mask_iou']:.4f} score err {score_err:.2e}")
    return rows, quality
