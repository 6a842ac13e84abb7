"""Training modes: which parameters learn, LoRA merging, gradient checkpointing, export and resume."""
from __future__ import annotations

import csv

import pytest
import torch

from anyseg import load_model
from anyseg.config import SamConfig, TinyViTConfig, PromptEncoderConfig, MaskDecoderConfig
from anyseg.modeling.sam import build_sam
from anyseg.train.config import ARCHS, TrainConfig
from anyseg.train.lora import LoRALinear, apply_lora, merge_lora, merged_state_dict
from anyseg.train.params import enable_gradient_checkpointing, param_groups, set_trainable
from anyseg.train.trainer import Trainer, cosine_schedule

DATA = "synthetic:count=6,seed=3,size=96"

TINY_TINYVIT = SamConfig(
    encoder=TinyViTConfig(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                          window_sizes=(4, 4, 4, 4), img_size=128, out_chans=32, num_classes=10),
    prompt=PromptEncoderConfig(embed_dim=32), decoder=MaskDecoderConfig(transformer_dim=32, mlp_dim=64,
                                                                        iou_head_hidden_dim=32))


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(data=DATA, arch="tiny", mode="full", steps=4, batch_size=2, masks_per_image=6, lr=1e-3,
                warmup_steps=1, output=str(tmp_path / "run"), save_every=2, loss_res="low")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("mode", ["decoder", "lora", "full"])
def test_gradients_reach_every_trainable_parameter(tmp_path, mode):
    trainer = Trainer(_cfg(tmp_path, mode=mode, masks_per_image=4), progress=False, log=lambda m: None)
    trainer.prepare_cache()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable
    reached = set()
    # Only the lowest-loss of the three ambiguity outputs gets a mask gradient, and LoRA's A matrices
    # only see gradient once B has left zero, so look over a few steps.
    for step in range(3):
        trainer.train_step(step)
        for name, p in trainer.model.named_parameters():
            if name in trainable:
                assert p.grad is not None, f"{mode}: no gradient reached {name}"
                assert torch.isfinite(p.grad).all(), name
                if p.grad.abs().sum() > 0:
                    reached.add(name)
            else:
                assert p.grad is None, f"{mode}: frozen {name} got a gradient"
    # The three ambiguity outputs compete: only the one with the lowest loss for a sample gets its
    # mask gradient, and at random init one output usually wins every time.
    hyper = {n for n in trainable if any(n.startswith(f"mask_decoder.output_hypernetworks_mlps.{k}.")
                                         for k in (1, 2, 3))}
    missing = trainable - reached - hyper
    assert not missing, f"{mode}: zero gradient for {sorted(missing)}"
    assert reached & hyper, f"{mode}: no ambiguity output was trained"
    encoder = {n for n in trainable if n.startswith("image_encoder.")}
    if mode == "decoder":
        assert not encoder
    elif mode == "lora":
        assert encoder and all(n.endswith(("lora_a", "lora_b")) for n in encoder)
    else:
        assert len(encoder) == sum(1 for n, _ in trainer.model.image_encoder.named_parameters())


@pytest.mark.parametrize("config", [ARCHS["tiny"], TINY_TINYVIT], ids=["vit", "tiny_vit"])
def test_lora_merge_equals_unmerged_model(config):
    torch.manual_seed(0)
    model = build_sam(config).eval()
    x = torch.randn(1, 3, config.img_size, config.img_size)
    with torch.no_grad():
        base = model.image_encoder(x)
    names = apply_lora(model.image_encoder, rank=3, alpha=6.0)
    assert names and all(n.endswith(("qkv", "proj")) for n in names)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.05)
    with torch.no_grad():
        unmerged = model.image_encoder(x)
        clean = build_sam(config).eval()
        clean.load_state_dict(merged_state_dict(model))  # strict: exactly the public keys
        from_state = clean.image_encoder(x)
        assert merge_lora(model) == len(names)
        merged = model.image_encoder(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(build_sam(config).state_dict())
    assert torch.allclose(unmerged, merged, atol=1e-5)
    assert torch.allclose(unmerged, from_state, atol=1e-5)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapters do change the encoder


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_sam(ARCHS["tiny"]).eval()
        set_trainable(model, "full")
        if ckpt:
            assert enable_gradient_checkpointing(model.image_encoder) == 2
        x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
        model.image_encoder(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.image_encoder.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_tiny_vit_full_mode_freezes_unused_classifier():
    model = build_sam(TINY_TINYVIT)
    trainable = set_trainable(model, "full")
    assert not any(n.startswith(("image_encoder.head.", "image_encoder.norm_head.")) for n in trainable)
    assert any(n.startswith("image_encoder.layers.") for n in trainable)


def test_layer_decay_and_weight_decay_groups():
    model = build_sam(ARCHS["tiny"])
    set_trainable(model, "full")
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # depth 2: stem 0, blocks 1..2, neck 3
    assert scale["image_encoder.patch_embed.proj.weight"] == 0.125
    assert scale["image_encoder.blocks.0.attn.qkv.weight"] == 0.25
    assert scale["image_encoder.blocks.1.mlp.lin1.weight"] == 0.5
    assert scale["image_encoder.neck.0.weight"] == 1.0
    assert scale["mask_decoder.iou_token.weight"] == 1.0
    assert wd["image_encoder.blocks.0.attn.qkv.weight"] == 0.1
    for name in ("image_encoder.pos_embed", "image_encoder.blocks.0.attn.qkv.bias", "image_encoder.blocks.0.norm1.weight",
                 "mask_decoder.iou_token.weight", "image_encoder.blocks.1.attn.rel_pos_h"):
        assert wd[name] == 0.0, name


def test_cosine_schedule_warms_up_and_decays():
    f = cosine_schedule(total=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_round_trips_through_load_model(tmp_path, mode):
    trainer = Trainer(_cfg(tmp_path, mode=mode, steps=1), progress=False, log=lambda m: None)
    summary = trainer.fit()
    path = summary["exported"]
    loaded = load_model(path)
    sd = merged_state_dict(trainer.model)
    assert set(loaded.state_dict()) == set(sd)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(loaded.image_encoder(x), trainer.model.image_encoder(x), atol=1e-5)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    # One thread: multi-threaded CPU backward passes are not bitwise reproducible even between two
    # uninterrupted runs, so bit-equality is only defined there.
    straight = Trainer(_cfg(tmp_path / "a", mode="full", threads=1), progress=False, log=lambda m: None)
    straight.fit()
    interrupted = Trainer(_cfg(tmp_path / "c", mode="full", threads=1), progress=False, log=lambda m: None)
    interrupted.fit(stop_after=2)  # stops after step 2, like a run killed after its step-2 checkpoint
    assert not (tmp_path / "c" / "run" / "model.pth").exists()
    messages = []
    resumed = Trainer(_cfg(tmp_path / "c", mode="full", threads=1), progress=False, log=messages.append)
    assert resumed.step == 2 and "resumed" in messages[0]
    resumed.fit()
    a = straight.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, a[k]), k
    with open(tmp_path / "a" / "run" / "log.csv") as fa, open(tmp_path / "c" / "run" / "log.csv") as fc:
        rows_a = [(r["step"], r["loss"]) for r in csv.DictReader(fa)]
        rows_c = [(r["step"], r["loss"]) for r in csv.DictReader(fc)]
    assert rows_a == rows_c and len(rows_a) == 4


def test_resume_refuses_a_different_run(tmp_path):
    Trainer(_cfg(tmp_path, mode="full", steps=1), progress=False, log=lambda m: None).fit()
    with pytest.raises(ValueError, match="different run"):
        Trainer(_cfg(tmp_path, mode="decoder", steps=1), progress=False, log=lambda m: None)
    # --fresh (resume=False) starts over
    assert Trainer(_cfg(tmp_path, mode="decoder", steps=1), resume=False, progress=False).step == 0


def test_config_validation_messages(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --model"):
        _cfg(tmp_path, model="x.pth").validate()
    with pytest.raises(ValueError, match="mode must be one of"):
        _cfg(tmp_path, mode="partial").validate()
    with pytest.raises(ValueError, match="hflip"):
        _cfg(tmp_path, mode="decoder", hflip=True).validate()


def test_worker_processes_give_the_same_run(tmp_path):
    # --workers reads the next steps' samples in other processes; the samples (and so the run) are the same.
    inline = Trainer(_cfg(tmp_path / "a", mode="full", threads=1), progress=False, log=lambda m: None)
    inline.fit()
    pooled = Trainer(_cfg(tmp_path / "b", mode="full", threads=1, workers=2), progress=False, log=lambda m: None)
    pooled.fit()
    assert pooled._pool is None, "the worker pool is shut down when the run ends"
    a = inline.model.state_dict()
    for k, v in pooled.model.state_dict().items():
        assert torch.equal(v, a[k]), k
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        Trainer(_cfg(tmp_path / "c", workers=-1), progress=False)
