"""The model behind the HTTP API: encode images into the cache, decode prompts, segment everything.
(The decoder graphs for the browser are in :mod:`.page_decoder`.)

All model calls run one at a time on one worker thread: on a CPU the cores are better spent on one
request at a time than shared between several, and a single thread keeps peak memory predictable (the
C allocator keeps freed memory per thread, so inference spread over many request threads would hold
one working set per thread). Prompts are in original-image
pixels (XY) throughout.

The model can be switched while serving (:meth:`Engine.switch`): the switch runs on the model thread
between two model calls, so a request is served wholly by the old model or wholly by the new one,
never fails because of it. Cached embeddings stay valid when the new model has the same image encoder
(e.g. after decoder fine-tuning); otherwise an image is encoded again the first time it is used.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..protocol import EncodedImage, ImagePredictor, make_predictor
from .cache import CacheEntry, EmbeddingCache

log = logging.getLogger("anyseg.server")


def content_id(data: bytes) -> str:
    """The id of an image: SHA-256 (hex) of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


class Engine:
    """A loaded model (of any family: it is only used through :mod:`anyseg.protocol`) and its embedding
    cache."""

    def __init__(self, model, cache: EmbeddingCache, *, max_pixels: int, model_name: str = "model") -> None:
        self.model = model
        self.model_name = model_name
        # Names the image encoder that cached embeddings must come from; changes when a switch brings
        # a model with another encoder.
        self.model_key = "m0"
        self._generation = 0
        self._switch_lock = threading.Lock()
        self.cache = cache
        self.max_pixels = max_pixels
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anyseg-model")
        self.encodes = 0
        # Model-level facts, read once; the predictors that run requests are made on the model thread.
        probe = make_predictor(model)
        self.family: str = probe.family
        self.mask_input_size: int = probe.mask_input_size
        self.embedding_shape = tuple(probe.embedding_shape)

    def predictor(self, entry: Optional[CacheEntry] = None) -> ImagePredictor:
        """A predictor of the model, holding ``entry``'s encoding when given (call on the model thread)."""
        predictor = make_predictor(self.model)
        if entry is not None:
            encoded = EncodedImage(entry.embedding, tuple(entry.state), entry.original_size, entry.input_size)
            # set_image with the entry's own pixels (what segment everything does for an uncropped image)
            # reuses the encoding instead of running the encoder again.
            predictor.set_encoded(encoded, image=entry.image)
        return predictor

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
        entry, cached = self.cache.get_or_create(content_id(data), lambda: self._encode(data, name))
        if entry.model_key != self.model_key:
            entry, cached = self.fresh(entry), False
        return entry, cached

    def _encode(self, data: bytes, name: str) -> CacheEntry:
        from PIL import Image

        from ..imageio import load_image

        try:
            image = load_image(data, max_pixels=self.max_pixels)
        except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours when set lower
            raise ValueError(f"image refused: {exc}") from exc
        def work():
            predictor = self.predictor()
            predictor.set_image(image)
            self.encodes += 1
            return predictor.encoded(), self.model_key

        encoded, key = self.run(work)
        return CacheEntry(content_id(data), encoded.embedding, image, tuple(encoded.original_size),
                          tuple(encoded.input_size), name, state=tuple(encoded.state), model_key=key)

    def fresh(self, entry: CacheEntry) -> CacheEntry:
        """``entry``, encoded again by the current model if it came from another image encoder."""
        if entry.model_key == self.model_key:
            return entry
        return self.run(self._refresh, entry)

    def _refresh(self, entry: CacheEntry) -> CacheEntry:
        """On the model thread: :meth:`fresh` (the entry in the cache is replaced)."""
        if entry.model_key == self.model_key:
            return entry
        predictor = self.predictor()
        predictor.set_image(entry.image)
        self.encodes += 1
        encoded = predictor.encoded()
        new = CacheEntry(entry.id, encoded.embedding, entry.image, tuple(encoded.original_size),
                         tuple(encoded.input_size), entry.name, state=tuple(encoded.state), model_key=self.model_key)
        try:
            self.cache.put(new)
        except ValueError:  # larger than the whole cache now: serve it uncached
            pass
        return new

    # ---------------------------------------------------------------------------------------- switch
    def switch(self, model, name: str) -> bool:
        """Serve ``model`` (called ``name``) from the next model call on. Returns whether the cached
        embeddings stay valid (same image encoder weights)."""
        with self._switch_lock:
            probe = make_predictor(model)
            same_encoder = _same_weights(self.model.image_encoder, model.image_encoder) and \
                getattr(self.model, "img_size", None) == getattr(model, "img_size", None)

            def swap():
                self.model, self.model_name = model, name
                self.family, self.mask_input_size = probe.family, probe.mask_input_size
                self.embedding_shape = tuple(probe.embedding_shape)
                if not same_encoder:
                    self._generation += 1
                    self.model_key = f"m{self._generation}"

            self.run(swap)
            log.info("now serving model %s (%s image encoder)", name, "same" if same_encoder else "new")
            return same_encoder

    # ---------------------------------------------------------------------------------------- decode
    def decode(
        self,
        entry: CacheEntry,
        point_coords: Optional[np.ndarray],
        point_labels: Optional[np.ndarray],
        box: Optional[np.ndarray],
        mask_input: Optional[np.ndarray],
        multimask: bool,
        hq_token_only: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one object: ``k x H x W`` bool, scores ``k``, low-res logits ``k x 256 x 256``.

        Points ``N x 2`` XY and box ``4`` XYXY are in original-image pixels; ``mask_input`` is
        ``1 x 256 x 256`` low-res logits of a previous prediction. Masks are sorted best first.
        ``hq_token_only`` (HQ-SAM models only) returns the HQ token's mask alone.
        """
        masks, scores, low_res, _ = self.decode_named(entry, point_coords, point_labels, box, mask_input,
                                                      multimask, hq_token_only)
        return masks, scores, low_res

    def decode_named(self, entry: CacheEntry, point_coords, point_labels, box, mask_input, multimask: bool,
                     hq_token_only: bool = False):
        """:meth:`decode`, also returning the name of the model that decoded."""
        if hq_token_only and not getattr(self.model, "is_hq", False):
            raise ValueError("hq_token_only applies to HQ-SAM models only; the served model has no HQ token")
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
            hq = {"hq_token_only": True} if hq_token_only else {}
            current = self._refresh(entry)
            out = self.predictor(current).decode(point_coords, point_labels, box, mask_input, multimask, **hq)
            return (*out, self.model_name)

        masks, scores, low_res, name = self.run(work)
        order = np.argsort(-scores, kind="stable")
        return masks[order], scores[order], low_res[order], name

    # ------------------------------------------------------------------------------------ everything
    def everything(self, entry: CacheEntry, **params: Any) -> List[Dict[str, Any]]:
        """Run the model's segment-everything generator on the entry's image with ``binary_mask`` output
        (:class:`~anyseg.protocol.UnsupportedByModel`, a ValueError, for a family that has none)."""
        return self.everything_named(entry, **params)[0]

    def everything_named(self, entry: CacheEntry, **params: Any) -> Tuple[List[Dict[str, Any]], str]:
        """:meth:`everything`, also returning the name of the model that ran."""
        def work():
            current = self._refresh(entry)
            records = self.predictor(current).mask_generator(output_mode="binary_mask", **params).generate(
                current.image)
            return records, self.model_name

        return self.run(work)


def _same_weights(a, b) -> bool:
    """Whether two modules hold the same parameters and buffers (names, shapes and values)."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    with torch.no_grad():
        return all(sa[k].shape == sb[k].shape and torch.equal(sa[k].detach().cpu(), sb[k].detach().cpu()) for k in sa)
