"""The reference's README and predictor notebook, with only the import changed: a model through
``sam_model_registry``, ``SamPredictor`` with ``set_image`` / ``predict``, and the notebook's batched
prompts through ``predictor.transform`` and ``predict_torch``; the results must equal the golden data
and anyseg's own API.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compat_helpers import GOLDEN_IDS, GOLDEN_MODELS, MISMATCH, read_rgb
from conftest import check_golden_outputs

# The imports user code makes, with ``segment_anything`` replaced by ``anyseg``.
from anyseg import SamPredictor
from anyseg.dropin import sam_model_registry


@pytest.mark.golden
@pytest.mark.filterwarnings(MISMATCH)
@pytest.mark.parametrize("model_type,checkpoint", GOLDEN_MODELS, ids=GOLDEN_IDS)
def test_predictor_notebook_batched_boxes(model_type, checkpoint, golden_dir, images_dir, manifest):
    # --- as in the reference's predictor notebook, with the import changed ---
    sam = sam_model_registry[model_type](checkpoint=golden_dir / checkpoint)
    sam.to(device="cpu")
    predictor = SamPredictor(sam)
    image = read_rgb(images_dir / "truck.jpg")
    predictor.set_image(image)
    name = "mobilesam" if model_type == "vit_t" else "vit_small"
    spec = next(p for p in manifest[name]["predictor"] if p["image"] == "truck.jpg")
    case = next(c for c in spec["cases"] if c["name"] == "batched_boxes")
    input_boxes = torch.tensor(case["boxes"], device=predictor.device)
    transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    masks, scores, logits = predictor.predict_torch(
        point_coords=None,
        point_labels=None,
        boxes=transformed_boxes,
        multimask_output=False,
    )
    # --- the same as the golden data and as anyseg's own API ---
    check_golden_outputs("batched_boxes", np.load(golden_dir / spec["file"]), masks.numpy(), scores.numpy(),
                         logits.numpy())
    ours = predictor  # anyseg's own API on the same embedding
    want = ours.predict_batch(boxes=np.array(case["boxes"]))
    np.testing.assert_array_equal(masks.numpy(), want.masks)
    np.testing.assert_array_equal(scores.numpy(), want.scores)
    np.testing.assert_array_equal(logits.numpy(), want.low_res_logits)

    # points and boxes together, one object per row (apply_coords_torch + apply_boxes_torch)
    points = torch.tensor([[[500.0, 375.0]], [[1125.0, 625.0]]])
    labels = torch.tensor([[1], [1]])
    boxes = torch.tensor([[75.0, 275.0, 1725.0, 850.0], [425.0, 600.0, 700.0, 875.0]])
    masks, scores, logits = predictor.predict_torch(
        point_coords=predictor.transform.apply_coords_torch(points, image.shape[:2]),
        point_labels=labels,
        boxes=predictor.transform.apply_boxes_torch(boxes, image.shape[:2]),
        multimask_output=True,
    )
    for i in range(2):
        m, s, lr = ours.predict(point_coords=points[i].numpy(), point_labels=labels[i].numpy(),
                                box=boxes[i].numpy(), multimask_output=True)
        np.testing.assert_allclose(scores[i].numpy(), s, atol=1e-5)
        np.testing.assert_allclose(logits[i].numpy(), lr, atol=1e-3)
        assert (masks[i].numpy() == m).mean() > 0.9999


