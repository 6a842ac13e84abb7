"""The training loop: modes ``decoder`` / ``lora`` / ``full`` / ``hq``, AdamW with warm-up + cosine decay and
layer-wise LR decay, optional bf16 autocast and gradient checkpointing, deterministic seeds, atomic
resumable checkpoints, CSV (and optional TensorBoard) logs, export in the public key layout.

Determinism: every random choice of step ``s`` (images, masks, flips, prompts) comes from generators
seeded with ``(seed, s)``, so a run resumed from its checkpoint at step ``s`` continues exactly as
an uninterrupted one (bit for bit on one CPU thread; multi-threaded CPU backward passes are not
bitwise reproducible even between two uninterrupted runs).
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write, write_json_atomic
from ..checkpoint import load_model, save_model
from ..modeling.sam import Sam, build_sam
from .cache import EmbeddingCache
from .config import IDENTITY_FIELDS, TrainConfig
from .datasets import open_dataset, select_masks, to_model_frame
from .interactive import run_interactive
from .lora import apply_lora, merged_state_dict
from .params import attach_hq, enable_gradient_checkpointing, param_groups, set_trainable

STATE_FORMAT = "anyseg-train-state"
LOG_FIELDS = ("step", "epoch", "lr", "loss", "focal", "dice", "iou_mse", "first_iou", "last_iou", "masks", "seconds")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return device


def cosine_schedule(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier after ``s`` scheduler steps: linear warm-up to 1, then cosine down to ``min_ratio``."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_training_model(cfg: TrainConfig) -> Sam:
    """The model a run starts from: loaded checkpoint or a fresh ``arch`` (seeded init), with LoRA
    adapters in mode ``lora``, freshly initialised HQ parts in mode ``hq`` when the model is a SAM 1
    model, and the trainable set for the mode. Encoder BatchNorms stay in eval."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, img_size=cfg.img_size) if cfg.model else build_sam(cfg.sam_config())
    if cfg.mode == "hq":
        model = attach_hq(model)
    model.eval()  # no dropout in SAM; BatchNorm statistics (TinyViT) stay frozen
    if cfg.mode == "lora":
        apply_lora(model.image_encoder, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        if cfg.lora_dropout > 0:
            for mod in model.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.train()
    set_trainable(model, cfg.mode)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model.image_encoder)
    return model


class Trainer:
    """Runs ``cfg.steps`` optimiser steps, resuming from ``OUTPUT/last.pt`` when it exists."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = True, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg.validate()
        self.log = log
        self.progress = progress
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = build_training_model(cfg).to(self.device)
        self.groups = param_groups(self.model, cfg.lr, cfg.weight_decay, cfg.layer_decay if cfg.mode != "decoder"
                                   else 1.0)
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in self.groups], lr=cfg.lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        self.dataset = open_dataset(cfg.data, cfg.images)
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {cfg.data} has no images with masks")
        self.img_size = self.model.img_size
        self.low_res = self.model.prompt_encoder.mask_input_size[0]
        self.grid = self.img_size if cfg.loss_res == "input" else self.low_res
        self.step = 0
        self._pool = None  # the --workers process pool while fit() runs
        self._pending: Dict = {}  # (step, dataset index) -> future of the sample
        self.cache: Optional[EmbeddingCache] = None
        self._tb = None
        state = self.out / "last.pt"
        if resume and state.exists():
            self._load_state(state)
        elif not resume and state.exists():
            state.unlink()

    # ----------------------------------------------------------------------------------- helpers
    def autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def batch_indices(self, step: int) -> List[int]:
        """Dataset indices of ``step``: consecutive slices of per-epoch seeded permutations."""
        n, bs = len(self.dataset), self.cfg.batch_size
        out = []
        for k in range(step * bs, (step + 1) * bs):
            epoch, pos = divmod(k, n)
            out.append(int(self._epoch_order(epoch)[pos]))
        return out

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = np.random.default_rng([self.cfg.seed, epoch, 11]).permutation(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def _to_grid(self, masks: torch.Tensor) -> torch.Tensor:
        if self.grid == masks.shape[-1]:
            return masks
        return F.interpolate(masks[:, None].float(), (self.grid, self.grid), mode="area")[:, 0] > 0.5

    def prepare_cache(self) -> None:
        if self.cfg.mode != "decoder" or self.cache is not None:
            return
        folder = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
        self.cache = EmbeddingCache(self.model, self.dataset, folder, dtype=getattr(torch, self.cfg.cache_dtype),
                                    autocast=self.autocast)
        self.cache.build(progress=self.progress)

    # ---------------------------------------------------------------------------------- samples
    # With --workers N, a process pool reads / generates the samples of the next steps while the
    # current one trains; a sample depends only on its index, so results are the same either way.
    PREFETCH_STEPS = 2

    def _prefetch(self, step: int) -> None:
        """Queue the samples of ``step`` and the next ``PREFETCH_STEPS`` steps; drop older ones."""
        if self._pool is None:
            return
        for ahead in range(step, min(self.cfg.steps, step + 1 + self.PREFETCH_STEPS)):
            for i in self.batch_indices(ahead):
                if (ahead, i) not in self._pending:
                    self._pending[(ahead, i)] = self._pool.submit(_load_sample, self.dataset, i)
        for key in [k for k in self._pending if k[0] < step]:
            self._pending.pop(key).cancel()

    def _sample(self, step: int, index: int):
        future = self._pending.pop((step, index), None)
        return future.result() if future is not None else self.dataset[index]

    def _start_workers(self) -> None:
        if self.cfg.workers > 0 and self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the workers never touch CUDA or torch's thread pools of this process
            self._pool = ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"))

    def _stop_workers(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    # -------------------------------------------------------------------------------------- step
    def train_step(self, step: int) -> Dict[str, float]:
        """One optimiser step; returns the logged values."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, 1])
        gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, step, 2]).integers(2**62)))
        images, gts, valids, sizes, owners, cached = [], [], [], [], [], []
        self._prefetch(step)
        for i in self.batch_indices(step):
            sample = self._sample(step, i)
            flip = bool(cfg.hflip and rng.uniform() < 0.5)
            frame = to_model_frame(sample, self.img_size, flip=flip)
            valid = torch.zeros(1, self.img_size, self.img_size, dtype=torch.bool)
            valid[:, : frame.input_size[0], : frame.input_size[1]] = True
            gt = self._to_grid(frame.masks)
            keep = [int(k) for k in select_masks(gt.numpy(), cfg.masks_per_image, rng)]
            if not keep:
                continue
            slot = len(images)
            images.append(frame.image)
            cached.append(i)
            gts.append(gt[keep])
            valids.append(self._to_grid(valid).expand(len(keep), -1, -1))
            sizes.append(torch.tensor([frame.input_size] * len(keep)))
            owners += [slot] * len(keep)
        self.optimizer.zero_grad(set_to_none=True)
        if not owners:
            return {"loss": float("nan"), "masks": 0}
        dev = self.device
        gt = torch.cat(gts).to(dev)
        valid = torch.cat(valids).to(dev)
        input_size = torch.cat(sizes).to(dev)
        owner = torch.tensor(owners, device=dev)
        hq_graph = hq_leaf = None
        if self.cache is not None:
            embeddings = torch.stack([self.cache.get(i) for i in cached]).to(dev)
            leaf = None
            per_mask = embeddings[owner]
        elif cfg.mode == "hq":
            # HQ-SAM's recipe: the encoder is frozen and runs without gradients; the HQ feature fusion
            # is computed once per image, and its gradient collected on a per-mask leaf (the
            # interactive loop back-propagates iteration by iteration).
            x = torch.stack([self.model.preprocess(img.to(dev)) for img in images])
            with torch.no_grad(), self.autocast():
                embeddings, interm = self.model.encode_image(x, return_interm=True)
            embeddings, interm = embeddings.float(), interm.float()
            with self.autocast():
                hq_graph = self.model.mask_decoder.hq_features(embeddings, interm)[owner]
            hq_leaf = hq_graph.detach().float().requires_grad_(True)
            leaf = None
            per_mask = embeddings[owner]
        else:
            x = torch.stack([self.model.preprocess(img.to(dev)) for img in images])
            with self.autocast():
                embeddings = self.model.encode_image(x)
            per_mask_graph = embeddings[owner]
            leaf = per_mask_graph.detach().float().requires_grad_(True)
            per_mask = leaf
        stats = run_interactive(self.model, per_mask, gt, valid, input_size, gen, self.cfg,
                                backward=True, autocast=self.autocast(), hq_features=hq_leaf)
        if leaf is not None and leaf.grad is not None:
            per_mask_graph.backward(leaf.grad.to(per_mask_graph.dtype))
        if hq_leaf is not None and hq_leaf.grad is not None:
            hq_graph.backward(hq_leaf.grad.to(hq_graph.dtype))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return {"lr": lr, "loss": stats.loss, "focal": stats.focal, "dice": stats.dice, "iou_mse": stats.iou_mse,
                "first_iou": stats.first_iou, "last_iou": stats.last_iou, "masks": len(owners)}

    # ---------------------------------------------------------------------------------------- fit
    def fit(self, stop_after: Optional[int] = None) -> Dict[str, object]:
        """Train until ``cfg.steps`` (or ``stop_after`` more steps, to split a run), saving the
        resumable state every ``save_every`` steps and at the end; exports the model when done."""
        self.prepare_cache()
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)
        log_path = self.out / "log.csv"
        self._trim_log(log_path)
        new_file = not log_path.exists()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last: Dict[str, float] = {}
        self._start_workers()
        try:
            with open(log_path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
                if new_file:
                    writer.writeheader()
                while self.step < end:
                    t0 = time.perf_counter()
                    row = self.train_step(self.step)
                    self.step += 1
                    row.update(step=self.step, epoch=(self.step * self.cfg.batch_size) // len(self.dataset),
                               seconds=round(time.perf_counter() - t0, 4))
                    writer.writerow({k: _fmt(row.get(k, "")) for k in LOG_FIELDS})
                    fh.flush()
                    self._tensorboard(row)
                    last = row
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                        iou=f"{row.get('last_iou', float('nan')):.3f}")
                    if self.step % self.cfg.save_every == 0 or self.step == end:
                        self.save_state()
        finally:
            self._stop_workers()
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.flush()
        exported = None
        if self.step >= self.cfg.steps:
            exported = self.export(self.out / self.cfg.export)
        summary = {"step": self.step, "steps": self.cfg.steps, "last": last,
                   "exported": None if exported is None else str(exported)}
        write_json_atomic(self.out / "summary.json", {"config": self.cfg.to_dict(), **summary}, indent=2)
        return summary

    # ---------------------------------------------------------------------------- state & export
    def save_state(self) -> Path:
        """Write ``OUTPUT/last.pt`` atomically: model, optimiser, scheduler, step, config."""
        path = self.out / "last.pt"
        state = {"format": STATE_FORMAT, "step": self.step, "config": self.cfg.to_dict(),
                 "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        with atomic_write(path, "wb") as fh:
            torch.save(state, fh)
        return path

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt state must not be silently replaced
            raise ValueError(f"cannot read the training state {path} ({exc}); delete it or pass --fresh") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an anyseg training state; delete it or pass --fresh")
        saved = state["config"]
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in IDENTITY_FIELDS
                   if saved.get(k) != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"{path} was written by a different run ({'; '.join(changed)}); use another "
                             f"--output or pass --fresh to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")

    def export(self, path) -> Path:
        """Save the trained model (LoRA merged) in the public key layout via :func:`anyseg.save_model`."""
        clean = build_sam(self.model.config)
        clean.load_state_dict({k: v.detach().float().cpu() for k, v in merged_state_dict(self.model).items()})
        return save_model(clean, path)

    def _trim_log(self, path: Path) -> None:
        """Drop log rows past the resumed step (they were written after the last checkpoint)."""
        if not path.exists():
            return
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= self.step]
        with atomic_write(path, "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def _tensorboard(self, row: Dict[str, float]) -> None:
        if not self.cfg.tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("--tensorboard needs the tensorboard package: pip install 'anyseg[train]'") from exc
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        for key in ("loss", "focal", "dice", "iou_mse", "first_iou", "last_iou", "lr"):
            if key in row:
                self._tb.add_scalar(f"train/{key}", row[key], row["step"])


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _load_sample(dataset, index: int):
    """``dataset[index]`` in a worker process (a module-level function, so that it pickles)."""
    return dataset[index]
