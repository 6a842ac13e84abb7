"""The reference's ``Sam.forward(batched_input, multimask_output)`` as its predictor notebook's last
section calls it, with only the import changed: several images, each with its own prompts (already in
the model frame through ``ResizeLongestSide``), in one call; the outputs must equal the predictor's.
"""
from __future__ import annotations

import pytest
import torch

from compat_helpers import read_rgb

# The imports user code makes, with ``segment_anything`` replaced by ``anyseg``.
from anyseg import SamPredictor
from anyseg.dropin import sam_model_registry
from anyseg.utils.transforms import ResizeLongestSide


def prepare_image(image, transform, device):
    image = transform.apply_image(image)
    image = torch.as_tensor(image, device=device)
    return image.permute(2, 0, 1).contiguous()


@pytest.mark.golden
@pytest.mark.parametrize("multimask_output", [False, True])
def test_sam_forward_equals_the_predictor(multimask_output, golden_dir, images_dir):
    sam = sam_model_registry["vit_t"](checkpoint=golden_dir / "mobilesam_checkpoint.pth")
    resize_transform = ResizeLongestSide(sam.image_encoder.img_size)
    image1, image2 = read_rgb(images_dir / "truck.jpg"), read_rgb(images_dir / "dog.jpg")
    boxes1 = torch.tensor([[75, 275, 1725, 850], [425, 600, 700, 875]], dtype=torch.float)
    points2 = torch.tensor([[[200.0, 150.0], [260.0, 200.0]]])
    labels2 = torch.tensor([[1, 0]])
    mask2 = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    batched_input = [
        {"image": prepare_image(image1, resize_transform, sam.device),
         "boxes": resize_transform.apply_boxes_torch(boxes1, image1.shape[:2]),
         "original_size": image1.shape[:2]},
        {"image": prepare_image(image2, resize_transform, sam.device),
         "point_coords": resize_transform.apply_coords_torch(points2, image2.shape[:2]),
         "point_labels": labels2, "mask_inputs": mask2,
         "original_size": image2.shape[:2]},
    ]
    batched_output = sam(batched_input, multimask_output=multimask_output)

    k = 3 if multimask_output else 1
    assert len(batched_output) == 2
    predictor = SamPredictor(sam)
    for record, output, image in zip(batched_input, batched_output, (image1, image2)):
        assert set(output) == {"masks", "iou_predictions", "low_res_logits"}
        b = 2 if "boxes" in record else 1
        assert output["masks"].shape == (b, k, *image.shape[:2]) and output["masks"].dtype == torch.bool
        assert output["iou_predictions"].shape == (b, k) and output["low_res_logits"].shape == (b, k, 256, 256)
        assert not output["low_res_logits"].requires_grad  # under no_grad, as the reference
        predictor.set_image(image)
        masks, iou, low_res = predictor.predict_torch(
            point_coords=record.get("point_coords"), point_labels=record.get("point_labels"),
            boxes=record.get("boxes"), mask_input=record.get("mask_inputs"), multimask_output=multimask_output)
        # the encoder runs on both images at once here: equal to float rounding
        torch.testing.assert_close(output["iou_predictions"], iou, atol=1e-4, rtol=0)
        torch.testing.assert_close(output["low_res_logits"], low_res, atol=1e-3, rtol=1e-4)
        assert (output["masks"] == masks).float().mean() > 0.9999


def test_sam_forward_refuses_hq_token_only_without_hq():
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"]()
    with pytest.raises(ValueError, match="HQ-SAM"):
        sam([{"image": torch.zeros(3, 1024, 1024), "original_size": (1024, 1024)}], False, hq_token_only=True)
