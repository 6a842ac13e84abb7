"""Image embeddings computed once and kept on disk, for decoder-only training with a frozen encoder.

Layout: ``FOLDER/<fingerprint>/<index>.pt``, one ``C x g x g`` tensor per dataset image, where the
fingerprint hashes the encoder weights, the input size, the storage dtype and the dataset's key. A
changed encoder or dataset therefore never reuses stale embeddings. Files are written atomically, so
an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch

from ..atomic import atomic_write
from ..modeling.sam import Sam
from .datasets import to_model_frame


def encoder_fingerprint(model: Sam) -> str:
    """A hash of the image encoder's weights and input size."""
    digest = hashlib.sha1(f"img_size={model.img_size}".encode())
    for name, tensor in model.image_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Embeddings of every image of ``dataset`` under ``model``'s (frozen) encoder.

    ``get(i)`` returns image ``i``'s embedding as a float32 ``C x g x g`` tensor on the CPU, for the
    image resized into the model frame by :func:`~anyseg.train.datasets.to_model_frame` (no flip).
    """

    def __init__(self, model: Sam, dataset, folder, dtype: torch.dtype = torch.float16,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> None:
        self.model = model
        self.dataset = dataset
        self.dtype = dtype
        self.autocast = autocast or contextlib.nullcontext
        key = hashlib.sha1(f"{encoder_fingerprint(model)}|{dataset.key}|{dtype}".encode()).hexdigest()[:16]
        self.folder = Path(folder) / key
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.pt"

    def missing(self):
        return [i for i in range(len(self.dataset)) if not self.path(i).exists()]

    @torch.inference_mode()
    def build(self, progress: bool = True, batch_size: int = 4) -> int:
        """Encode every image not cached yet; returns how many were encoded."""
        todo = self.missing()
        if not todo:
            return 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="cache embeddings", unit="img", dynamic_ncols=True)
        device = self.model.device
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                x = torch.stack([self.model.preprocess(to_model_frame(self.dataset[i], self.model.img_size)
                                                       .image.to(device)) for i in chunk])
                with self.autocast():
                    emb = self.model.encode_image(x)
                for i, e in zip(chunk, emb):
                    with atomic_write(self.path(i), "wb") as fh:
                        torch.save(e.detach().to("cpu", self.dtype).clone(), fh)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return len(todo)

    def get(self, index: int) -> torch.Tensor:
        path = self.path(index)
        if not path.exists():
            raise FileNotFoundError(f"embedding {index} is not cached ({path}); call build() first")
        return torch.load(str(path), map_location="cpu", weights_only=True).float()
