"""Decoder-only fine-tuning of the golden ``vit_small`` checkpoint improves held-out 1-point mIoU.

The checkpoint's weights are random (``golden/README.md``), so its masks ignore the prompt: about
0.04 1-point mIoU on the synthetic scenes. The test runs the real commands, in process:
``anyseg eval`` of the untouched checkpoint, ``anyseg train --mode decoder`` (encoder frozen,
embeddings cached), ``anyseg eval`` of the exported model, on held-out scenes of another seed.

Everything runs at ``--img-size 256``: the checkpoint's position tables are resampled for a 256 px
frame (a 16 x 16 embedding grid instead of 64 x 64), which makes the decoder 16x cheaper, so the
~3000 prompt sessions it needs fit in about two minutes of one CPU thread. Both evaluations use the
same size. The recipe (docs/training.md): lr 5e-4 and BCE + dice; SAM's 20 : 1 focal + dice and
learning rates of 2e-3 and more do not learn on this budget.

Measured on the development machine (training seeds 0, 1, 2; docs/training.md): 1-point oracle
mIoU 0.044 -> 0.18-0.19 (gain >= 0.137), confident 0.037 -> 0.12-0.19 (gain >= 0.085); the run
takes ~2 minutes on one thread. The asserted gains (0.09, 0.05) are about two thirds of the
smallest measured ones, as slack for other CPUs (learning starts after ~100 of the 200 steps, and
the trajectory of a from-scratch decoder is sensitive to rounding).
"""
from __future__ import annotations

import json

import pytest
import torch

from anyseg import load_model
from anyseg.cli import main

TRAIN = "synthetic:count=200,seed=0,size=256,objects=1-3"
HELDOUT = "synthetic:count=16,seed=1000,size=256,objects=1-3"
SIZE = "256"
RECIPE = ["--img-size", SIZE, "--mode", "decoder", "--steps", "200", "--batch-size", "4", "--masks-per-image", "4",
          "--lr", "5e-4", "--warmup-steps", "5", "--focal-weight", "1", "--focal-alpha", "-1", "--focal-gamma", "0",
          "--dice-weight", "1", "--point-iters", "0", "--refine-iters", "0", "--box-prob", "0", "--loss-res", "low",
          "--seed", "0", "--save-every", "50", "--device", "cpu"]
ORACLE_GAIN = 0.09
CONFIDENT_GAIN = 0.05


def _eval(model, out, name):
    argv = ["eval", "--model", str(model), "--img-size", SIZE, "--data", HELDOUT, "--max-instances", "4",
            "--clicks", "1", "-o", str(out), "--name", name, "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    record = json.loads((out / f"{name}.json").read_text())
    assert record["img_size"] == int(SIZE)
    return record["summary"]


@pytest.mark.slow
def test_decoder_finetune_of_golden_vit_small_improves_heldout_miou(golden_dir, tmp_path):
    checkpoint = golden_dir / "vit_small_checkpoint.pth"
    run, evals = tmp_path / "run", tmp_path / "eval"
    before = _eval(checkpoint, evals, "before")
    assert main(["train", "--model", str(checkpoint), "--data", TRAIN, *RECIPE, "-o", str(run), "--quiet"]) == 0
    after = _eval(run / "model.pth", evals, "after")

    assert after["instances"] == before["instances"] >= 40
    assert after["point_oracle_miou"] >= before["point_oracle_miou"] + ORACLE_GAIN, (before, after)
    assert after["point_confident_miou"] >= before["point_confident_miou"] + CONFIDENT_GAIN, (before, after)

    # decoder-only: the exported encoder is the golden one at 256 px, bit for bit; the decoder moved
    golden = load_model(checkpoint, img_size=int(SIZE)).state_dict()
    trained = load_model(run / "model.pth").state_dict()
    assert trained.keys() == golden.keys()
    for key in golden:
        if key.startswith("image_encoder."):
            assert torch.equal(trained[key], golden[key]), key
    moved = [k for k in golden if k.startswith("mask_decoder.") and not torch.equal(trained[k], golden[k])]
    assert len(moved) > 0.9 * sum(k.startswith("mask_decoder.") for k in golden)
