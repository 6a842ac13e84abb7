"""Fine-tuning scripts written for the reference, in MedSAM's and SAMed's style, with only the import
changed: they build the model through ``sam_model_registry``, read its attributes, and call
``model.image_encoder``, ``model.prompt_encoder(points=, boxes=, masks=)`` and
``model.mask_decoder(image_embeddings=, image_pe=, sparse_prompt_embeddings=, dense_prompt_embeddings=,
multimask_output=)`` themselves, with ``model.preprocess`` / ``model.postprocess_masks`` around them.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compat_helpers import MISMATCH, golden_models, read_rgb  # noqa: F401 (fixture)

# The imports user code makes, with ``segment_anything`` replaced by ``anyseg``.
from anyseg import SamPredictor
from anyseg.dropin import sam_model_registry
from anyseg.utils.transforms import ResizeLongestSide


@pytest.mark.parametrize("key", ["vit_t", "vit_b"], ids=["mobilesam", "vit_small"])
def test_model_attributes_user_code_reads(golden_models, key):
    sam, _ = golden_models[key]  # a TinyViT and a ViT encoder
    assert sam.mask_threshold == 0.0 and sam.image_format == "RGB" and sam.device == torch.device("cpu")
    assert sam.image_encoder.img_size == 1024
    assert sam.prompt_encoder.embed_dim == 256
    assert tuple(sam.prompt_encoder.image_embedding_size) == (64, 64)
    assert sam.prompt_encoder.get_dense_pe().shape == (1, 256, 64, 64)
    assert sam.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert sam.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])


def test_fine_tuning_style_calls(golden_models, images_dir):
    """MedSAM-style: frozen encoder, box prompt through the prompt encoder, decoder, postprocess; the
    result equals the predictor's box prediction."""
    sam, _ = golden_models["vit_t"]
    image = read_rgb(images_dir / "dog.jpg")
    box = np.array([40, 27, 400, 267])
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    x = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        embedding = sam.image_encoder(sam.preprocess(x))
        box_torch = torch.as_tensor(transform.apply_boxes(box, image.shape[:2]))[:, None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
        masks = sam.postprocess_masks(low_res, input_size=tuple(x.shape[-2:]), original_size=image.shape[:2])
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    want_masks, want_iou, want_low_res = predictor.predict(box=box, multimask_output=False)
    assert torch.equal(embedding, predictor.get_image_embedding())
    np.testing.assert_array_equal(low_res[0].numpy(), want_low_res)
    np.testing.assert_array_equal(iou[0].numpy(), want_iou)
    np.testing.assert_array_equal((masks[0] > sam.mask_threshold).numpy(), want_masks)


def test_mask_decoder_reference_keywords(golden_models):
    sam, _ = golden_models["vit_t"]
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 20.0, 300.0, 400.0]]), masks=None)
    with torch.no_grad():
        low_res, iou = sam.mask_decoder(image_embeddings=torch.zeros(1, 256, 64, 64),
                                        image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
    assert low_res.shape == (1, 1, 256, 256) and iou.shape == (1, 1)



# --------------------------------------------------------------------------------------------------
# A MedSAM-style training script: a few steps of decoder fine-tuning on box prompts
# --------------------------------------------------------------------------------------------------


class MedSAMStyle(nn.Module):
    """The wrapper MedSAM-style scripts write around the reference's model (written for this suite)."""

    def __init__(self, image_encoder, mask_decoder, prompt_encoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.mask_decoder = mask_decoder
        self.prompt_encoder = prompt_encoder
        for param in self.prompt_encoder.parameters():  # the prompt encoder stays frozen
            param.requires_grad = False

    def decode(self, image_embedding, box):
        with torch.no_grad():
            box_torch = torch.as_tensor(box, dtype=torch.float32, device=image_embedding.device)
            if len(box_torch.shape) == 2:
                box_torch = box_torch[:, None, :]  # B x 1 x 4
            sparse_embeddings, dense_embeddings = self.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_masks, _ = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_embeddings,
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=False,
        )
        return low_res_masks

    def forward(self, image, box):
        image_embedding = self.image_encoder(image)
        low_res_masks = self.decode(image_embedding, box)
        return F.interpolate(low_res_masks, size=(image.shape[2], image.shape[3]), mode="bilinear",
                             align_corners=False)


def dice_loss(logits, target):
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((-1, -2))
    return (1 - (2 * inter + 1e-5) / (prob.sum((-1, -2)) + target.sum((-1, -2)) + 1e-5)).mean()


@pytest.mark.golden
@pytest.mark.filterwarnings(MISMATCH)
def test_medsam_style_fine_tuning(golden_dir, images_dir):
    # --- the script: model through the registry, images resized and normalised as the model expects ---
    torch.manual_seed(0)
    sam_model = sam_model_registry["vit_b"](checkpoint=golden_dir / "vit_small_checkpoint.pth")
    model = MedSAMStyle(sam_model.image_encoder, sam_model.mask_decoder, sam_model.prompt_encoder)
    model.train()
    size = sam_model.image_encoder.img_size
    transform = ResizeLongestSide(size)
    image = read_rgb(images_dir / "dog.jpg")
    resized = transform.apply_image(image)
    x = sam_model.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())  # 1 x 3 x S x S
    # two objects of the image, boxes in the model frame; the ground truth: the ellipses inside the boxes
    boxes = transform.apply_boxes(np.array([[40, 27, 400, 267], [150, 60, 300, 200]]), image.shape[:2])
    yy, xx = torch.meshgrid(torch.arange(size // 4) + 0.5, torch.arange(size // 4) + 0.5, indexing="ij")
    gt = []
    for x0, y0, x1, y1 in boxes / 4:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        gt.append((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).float())
    gt = torch.stack(gt)[:, None]  # 2 x 1 x S/4 x S/4

    # one full forward / backward through the three parts: gradients reach the encoder and the decoder
    encoder_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    pred = model(x.expand(2, -1, -1, -1), boxes)
    assert pred.shape == (2, 1, size, size)
    F.binary_cross_entropy_with_logits(pred, F.interpolate(gt, size=(size, size))).backward()
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.prompt_encoder.parameters())
    model.zero_grad(set_to_none=True)

    # decoder fine-tuning on the frozen encoder's embedding (a few steps, Adam, dice + BCE)
    with torch.no_grad():
        embedding = model.image_encoder(x)
    optimizer = torch.optim.AdamW(model.mask_decoder.parameters(), lr=1e-4, weight_decay=0.01)
    losses = []
    for _ in range(6):
        low_res = model.decode(embedding, boxes)
        loss = dice_loss(low_res, gt) + F.binary_cross_entropy_with_logits(low_res, gt)
        optimizer.zero_grad()
        loss.backward()
        # every decoder weight on the path of mask 0 gets a finite gradient (the other masks' MLPs and the
        # IoU head are not in this loss)
        unused = ("output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3.",
                  "iou_prediction_head.")
        for name, p in model.mask_decoder.named_parameters():
            if not name.startswith(unused):
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
    # the encoder was not stepped, and the trained decoder still gives masks in the original frame
    for k, v in model.image_encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    model.eval()
    with torch.no_grad():
        masks = sam_model.postprocess_masks(model.decode(embedding, boxes), input_size=resized.shape[:2],
                                            original_size=image.shape[:2])
    assert masks.shape == (2, 1, *image.shape[:2])
