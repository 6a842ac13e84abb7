"""What the compatibility tests share: the golden checkpoints under their registry keys, the image
reader that stands in for OpenCV, and the module-scoped ``golden_models`` fixture (import it into a
test module to use it).

The test modules of this folder import this file as ``compat_helpers`` and the shared fixtures'
helpers as ``conftest`` (``tests/conftest.py``), as the other test modules do.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from anyseg.checkpoint import load_model
from anyseg.dropin import sam_model_registry

#: (registry key, golden checkpoint). The small ViT has no key of its own: it loads under ``vit_b``
#: with a warning that names the architecture the file holds.
GOLDEN_MODELS = [("vit_t", "mobilesam_checkpoint.pth"), ("vit_b", "vit_small_checkpoint.pth")]
GOLDEN_IDS = ["mobilesam", "vit_small"]
MISMATCH = "ignore:sam_model_registry"

#: Parameter counts of the reference architectures (whole model: encoder, prompt encoder, decoder).
PARAMS = {"vit_h": 641_090_608, "vit_l": 312_342_832, "vit_b": 93_735_472}


def read_rgb(path) -> np.ndarray:
    """What ``cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)`` gives in the reference's programs."""
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def golden_models(golden_dir):
    """``{registry key: (model through the registry, model through load_model)}``."""
    out = {}
    for key, name in GOLDEN_MODELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out[key] = (sam_model_registry[key](checkpoint=golden_dir / name), load_model(golden_dir / name))
    return out

