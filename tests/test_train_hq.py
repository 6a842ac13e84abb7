"""``--mode hq`` training (HQ-SAM's recipe): only the HQ parts learn, a short run lowers the loss on the
generated scenes, the exported file is an HQ-SAM checkpoint that loads; a SAM 1 model gets fresh HQ parts."""
from __future__ import annotations

import csv

import pytest
import torch

from anyseg import load_model
from anyseg.checkpoint import save_model
from anyseg.cli import main
from anyseg.config import HQConfig, MaskDecoderConfig, SamConfig, ViTConfig
from anyseg.modeling.hq import HQ_KEY_PREFIXES, hq_parameters
from anyseg.modeling.sam import build_sam
from anyseg.train.config import TrainConfig
from anyseg.train.params import attach_hq, set_trainable
from anyseg.train.trainer import Trainer

DATA = "synthetic:count=6,seed=3,size=96"


def _config(hq: bool) -> SamConfig:
    return SamConfig(encoder=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(0,),
                                       window_size=4, img_size=128),
                     decoder=MaskDecoderConfig(depth=1, mlp_dim=64), hq=HQConfig(vit_dim=32) if hq else None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hq_ckpt")
    torch.manual_seed(0)
    hq = save_model(build_sam(_config(True)), folder / "hq.pth")
    sam1 = save_model(build_sam(_config(False)), folder / "sam1.pth")
    return {"hq": str(hq), "sam1": str(sam1)}


def _cfg(tmp_path, model, **kw) -> TrainConfig:
    base = dict(data=DATA, model=model, mode="hq", steps=4, batch_size=2, masks_per_image=4, lr=1e-3,
                warmup_steps=1, output=str(tmp_path / "run"), save_every=100, loss_res="low", point_iters=1,
                refine_iters=0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _is_hq_key(name: str) -> bool:
    return name.startswith("mask_decoder.") and name.split(".")[1] in HQ_KEY_PREFIXES


def test_gradients_reach_exactly_the_hq_parameters(tmp_path, checkpoints):
    trainer = Trainer(_cfg(tmp_path, checkpoints["hq"]), progress=False, log=lambda m: None)
    model = trainer.model
    hq = {n for n, _ in hq_parameters(model)}
    assert hq == {n for n, _ in model.named_parameters() if _is_hq_key(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == hq
    # The optimiser holds the HQ parameters and nothing else.
    assert {n for g in trainer.groups for n in g["names"]} == hq
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step(0)
    for name, p in model.named_parameters():
        if name in hq:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient reached {name}"
            assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
            assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"


def test_set_trainable_hq_refuses_a_model_without_hq_parts():
    with pytest.raises(ValueError, match="mode 'hq'.*has none"):
        set_trainable(build_sam(_config(False)), "hq")


def test_short_run_lowers_the_loss_and_the_export_loads(tmp_path, checkpoints):
    # One fixed batch (the same 2 images each step), so that the loss curve measures learning.
    cfg = _cfg(tmp_path, checkpoints["hq"], data="synthetic:count=2,seed=5,size=96", steps=12, lr=3e-3,
               warmup_steps=1, min_lr_ratio=1.0, focal_weight=1.0)
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    frozen = {k: v.clone() for k, v in trainer.model.state_dict().items() if not _is_hq_key(k)}
    summary = trainer.fit()
    with open(tmp_path / "run" / "log.csv", newline="") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses
    # The export is an HQ-SAM checkpoint in the public layout: SAM keys unchanged, HQ keys trained.
    sd = torch.load(summary["exported"], map_location="cpu", weights_only=True)
    assert "mask_decoder.hf_token.weight" in sd and "mask_decoder.compress_vit_feat.0.weight" in sd
    loaded = load_model(summary["exported"])
    assert loaded.is_hq
    state = loaded.state_dict()
    for key, value in frozen.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_sam1_checkpoint_gets_fresh_hq_parts(tmp_path, checkpoints):
    sam1 = load_model(checkpoints["sam1"])
    attached = attach_hq(sam1)
    assert attached.is_hq and attach_hq(attached) is attached
    for key, value in sam1.state_dict().items():
        assert torch.equal(attached.state_dict()[key], value), key
    code = main(["train", "--model", checkpoints["sam1"], "--mode", "hq", "--data", DATA, "--steps", "2",
                 "--batch-size", "1", "--masks-per-image", "2", "--point-iters", "0", "--refine-iters", "0",
                 "--loss-res", "low", "--threads", "1", "-o", str(tmp_path / "cli"), "--quiet"])
    assert code == 0
    loaded = load_model(str(tmp_path / "cli" / "model.pth"))
    assert loaded.is_hq
    assert {n for n, _ in hq_parameters(loaded)}
