"""The model behind the HTTP API: encode images into the cache, decode prompts, segment everything,
and export the decoder graph for the browser.

All model calls run one at a time on one worker thread: on a CPU the cores are better spent on one
request at a time than shared between several, and a single thread keeps peak memory predictable (the
C allocator keeps freed memory per thread, so inference spread over many request threads would hold
one working set per thread). Prompts are in original-image
pixels (XY) throughout.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..predictor import SamPredictor
from .cache import CacheEntry, EmbeddingCache

log = logging.getLogger("anyseg.server")

DECODER_OPSET = 17


def content_id(data: bytes) -> str:
    """The id of an image: SHA-256 (hex) of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


class _CachedPredictor(SamPredictor):
    """A predictor whose image embedding comes from a cache entry instead of the encoder.

    ``set_image`` with the entry's own pixels (what :class:`~anyseg.MaskGenerator` does for an
    uncropped image) reuses the cached embedding; any other image is encoded as usual.
    """

    def __init__(self, model, entry: CacheEntry) -> None:
        super().__init__(model)
        self.entry = entry
        self._use_entry()

    def _use_entry(self) -> None:
        entry = self.entry
        self.reset_image()
        dtype = next(self.model.parameters()).dtype
        self.features = torch.from_numpy(entry.embedding).to(self.device, dtype)
        self.original_size = tuple(entry.original_size)
        self.input_size = tuple(entry.input_size)
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.is_image_set = True

    def set_image(self, image, image_format: str = "RGB") -> None:
        if (isinstance(image, np.ndarray) and image.shape == self.entry.image.shape
                and np.array_equal(image, self.entry.image)):
            self._use_entry()
        else:
            super().set_image(image, image_format)


class Engine:
    """A loaded model, its embedding cache and its exported decoder."""

    def __init__(self, model, cache: EmbeddingCache, *, max_pixels: int) -> None:
        self.model = model
        self.cache = cache
        self.max_pixels = max_pixels
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anyseg-model")
        self.encodes = 0

    def run(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the model thread and return its result (or raise its error)."""
        return self._worker.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------- encode
    def encode_bytes(self, data: bytes, name: str = "") -> Tuple[CacheEntry, bool]:
        """Decode and encode an image file's bytes (cached by content hash). Returns ``(entry, cached)``.

        Raises ValueError for empty, corrupt or over-large images.
        """
        return self.cache.get_or_create(content_id(data), lambda: self._encode(data, name))

    def _encode(self, data: bytes, name: str) -> CacheEntry:
        from PIL import Image

        from ..imageio import load_image

        try:
            image = load_image(data, max_pixels=self.max_pixels)
        except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours when set lower
            raise ValueError(f"image refused: {exc}") from exc
        def work():
            predictor = SamPredictor(self.model)
            predictor.set_image(image)
            self.encodes += 1
            return predictor, predictor.features.detach().float().cpu().numpy().copy()

        predictor, embedding = self.run(work)
        return CacheEntry(content_id(data), embedding, image, predictor.original_size, predictor.input_size, name)

    # ---------------------------------------------------------------------------------------- decode
    def decode(
        self,
        entry: CacheEntry,
        point_coords: Optional[np.ndarray],
        point_labels: Optional[np.ndarray],
        box: Optional[np.ndarray],
        mask_input: Optional[np.ndarray],
        multimask: bool,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one object: ``k x H x W`` bool, scores ``k``, low-res logits ``k x 256 x 256``.

        Points ``N x 2`` XY and box ``4`` XYXY are in original-image pixels; ``mask_input`` is
        ``1 x 256 x 256`` low-res logits of a previous prediction. Masks are sorted best first.
        """
        if point_coords is None and box is None:
            raise ValueError("a decode request needs at least one point or a box")
        h, w = entry.original_size
        for what, arr in (("point", point_coords), ("box", box)):
            if arr is None:
                continue
            xy = np.asarray(arr, dtype=np.float64).reshape(-1, 2)
            outside = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
            if outside.any():
                raise ValueError(f"{what} coordinates must lie inside the {w}x{h} image (XY pixels), "
                                 f"got {xy[outside].tolist()}")
        def work():
            predictor = _CachedPredictor(self.model, entry)
            return predictor.predict(point_coords, point_labels, box, mask_input, multimask)

        masks, scores, low_res = self.run(work)
        order = np.argsort(-scores, kind="stable")
        return masks[order], scores[order], low_res[order]

    # ------------------------------------------------------------------------------------ everything
    def everything(self, entry: CacheEntry, **params: Any) -> List[Dict[str, Any]]:
        """Run :class:`~anyseg.MaskGenerator` on the entry's image with ``binary_mask`` output."""
        from ..automatic import MaskGenerator

        def work():
            predictor = _CachedPredictor(self.model, entry)
            return MaskGenerator(predictor, output_mode="binary_mask", **params).generate(entry.image)

        return self.run(work)


class DecoderExport:
    """The model's decoder as an ONNX graph for the browser, exported once in the background.

    ``status`` is ``"exporting"``, ``"ready"`` (``path`` and ``cache_path`` are the files) or
    ``"unavailable"`` (``reason`` says why; the page then decodes on the server). Graphs are cached on
    disk by a hash of the prompt encoder and mask decoder weights, so a restart reuses the files. There
    are two: the per-image graph (``export_decoder_cache``), which the page runs once per image, and
    the per-click graph that takes its outputs (``export_decoder(fast=True, upscale_masks=False,
    image_cache=True)``): the fast decoder arithmetic, stopping at the low-res logits. The page
    upscales the candidates itself (``static/masks.js``, ``upscaleLogits``).
    """

    def __init__(self, model, directory: Optional[Path], enabled: bool = True) -> None:
        self.status = "unavailable"
        self.reason = "the browser decoder is disabled (--no-browser-decoder)"
        self.path: Optional[Path] = None
        self.cache_path: Optional[Path] = None
        self._thread: Optional[threading.Thread] = None
        if not enabled:
            return
        if directory is None:
            from ..hub import cache_dir

            directory = cache_dir() / "onnx"
        self.directory = Path(directory)
        stem = f"decoder-{_decoder_key(model)[:20]}-opset{DECODER_OPSET}"
        self.target = self.directory / f"{stem}-fast-lowres-cached.onnx"
        self.cache_target = self.directory / f"{stem}-image-cache.onnx"
        if self.target.is_file() and self.cache_target.is_file():
            self.status, self.reason, self.path, self.cache_path = "ready", "", self.target, self.cache_target
            return
        self.status, self.reason = "exporting", "the decoder graph is being exported"
        # Export a CPU float32 copy, so that serving goes on with the original meanwhile.
        with torch.no_grad():
            snapshot = copy.deepcopy(model).to("cpu", torch.float32).eval()
        self._thread = threading.Thread(target=self._run, args=(snapshot,), name="anyseg-decoder-export", daemon=True)
        self._thread.start()

    def wait(self, timeout: Optional[float] = None) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    def _run(self, snapshot) -> None:
        try:
            from ..export import export_decoder, export_decoder_cache  # type: ignore[attr-defined]
        except ImportError as exc:
            self.status, self.reason = "unavailable", f"ONNX export is not available ({exc}); install anyseg[onnx]"
            return
        tag = f".tmp-{os.getpid()}-{threading.get_ident()}-"
        tmp, cache_tmp = (t.with_name(tag + t.name) for t in (self.target, self.cache_target))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            export_decoder(snapshot, tmp, opset=DECODER_OPSET, fast=True, upscale_masks=False, image_cache=True)
            export_decoder_cache(snapshot, cache_tmp, opset=DECODER_OPSET)
            # The per-image graph goes into place first: a decoder graph on disk means both are there.
            os.replace(cache_tmp, self.cache_target)
            os.replace(tmp, self.target)
            self.path, self.cache_path = self.target, self.cache_target
            self.status, self.reason = "ready", ""
            log.info("decoder graphs exported to %s", self.target.parent)
        except Exception as exc:  # any failure leaves server-side decoding in place
            log.warning("decoder export failed: %s", exc)
            self.status, self.reason = "unavailable", f"decoder export failed: {type(exc).__name__}: {exc}"
        finally:
            for t in (tmp, cache_tmp):
                if t.exists():
                    t.unlink()


def _decoder_key(model) -> str:
    digest = hashlib.sha256(f"opset{DECODER_OPSET}".encode())
    state = {**{f"p.{k}": v for k, v in model.prompt_encoder.state_dict().items()},
             **{f"d.{k}": v for k, v in model.mask_decoder.state_dict().items()}}
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(str(getattr(model, "img_size", "")).encode())
    return digest.hexdigest()
