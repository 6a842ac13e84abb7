"""HQ-SAM checkpoints: the variant is inferred from keys and shapes (meta-device state dicts built from
the spec's layout), loading is strict (all 25 HQ keys or none), and the registry knows the public files."""
from __future__ import annotations

import pytest
import torch

from anyseg import hub
from anyseg.checkpoint import CheckpointError, infer_config, model_from_state_dict
from anyseg.config import HQ_VARIANTS, VARIANTS
from anyseg.modeling.hq import HQ_KEY_PREFIXES, hq_parameters
from anyseg.modeling.sam import build_sam

# spec/hq_sam.md 1: key counts (SAM 1 keys + 25) and vit_dim per public variant.
PUBLIC = {"hq_vit_b": (339, 768), "hq_vit_l": (507, 1024), "hq_vit_h": (619, 1280), "hq_vit_tiny": (464, 160)}


def _meta_state_dict(name):
    """The variant's state dict as meta tensors (TinyViT builds a lookup table from real values while it is
    constructed, so it is built on the CPU, which is cheap at its size, and its tensors moved to meta)."""
    if HQ_VARIANTS[name].encoder.kind == "tiny_vit":
        model = build_sam(HQ_VARIANTS[name])
    else:
        with torch.device("meta"):
            model = build_sam(HQ_VARIANTS[name])
    return model, {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_variant_is_inferred_from_keys(name):
    n_keys, vit_dim = PUBLIC[name]
    model, sd = _meta_state_dict(name)
    assert len(sd) == n_keys
    hq_keys = [k for k in sd if k.split(".")[1] in HQ_KEY_PREFIXES]
    assert len(hq_keys) == 25 and all(k.startswith("mask_decoder.") for k in hq_keys)
    assert sd["mask_decoder.compress_vit_feat.0.weight"].shape == (vit_dim, 256, 2, 2)
    config = infer_config(sd)
    assert config.hq is not None and config.hq.vit_dim == vit_dim
    assert config.encoder == HQ_VARIANTS[name].encoder
    assert config.decoder == HQ_VARIANTS[name].decoder
    # The HQ part is what --mode hq trains: 1024 * D + 284,672 parameters.
    assert sum(p.numel() for _, p in hq_parameters(model)) == 1024 * vit_dim + 284672


def test_plain_sam_is_not_hq():
    with torch.device("meta"):
        sd = build_sam(VARIANTS["vit_b"]).state_dict()
    assert infer_config(sd).hq is None


def _small_hq_state_dict():
    from anyseg.config import HQConfig, MaskDecoderConfig, SamConfig, ViTConfig

    config = SamConfig(encoder=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                                         window_size=4, img_size=128),
                       decoder=MaskDecoderConfig(depth=1, mlp_dim=64), hq=HQConfig(vit_dim=32))
    return {k: v.clone() for k, v in build_sam(config).state_dict().items()}


def test_small_hq_round_trip():
    sd = _small_hq_state_dict()
    model = model_from_state_dict(sd)
    assert model.is_hq and model.config.hq.vit_dim == 32


def test_missing_hq_key_is_named():
    sd = _small_hq_state_dict()
    del sd["mask_decoder.hf_mlp.layers.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\)[\s\S]*hf_mlp\.layers\.2\.bias"):
        model_from_state_dict(sd)


def test_partial_hq_keys_without_token_are_unexpected():
    sd = _small_hq_state_dict()
    del sd["mask_decoder.hf_token.weight"]  # now read as plain SAM: the other 24 HQ keys are extra
    with pytest.raises(CheckpointError, match=r"unexpected keys \(24\)[\s\S]*compress_vit_feat"):
        model_from_state_dict(sd)


def test_extra_key_is_named():
    sd = _small_hq_state_dict()
    sd["mask_decoder.hf_token2.weight"] = torch.zeros(1, 256)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\)[\s\S]*hf_token2"):
        model_from_state_dict(sd)


def test_wrong_vit_dim_is_malformed():
    sd = _small_hq_state_dict()
    sd["mask_decoder.compress_vit_feat.0.weight"] = torch.zeros(48, 256, 2, 2)
    with pytest.raises(CheckpointError, match="compress_vit_feat.0.weight takes 48 channels"):
        model_from_state_dict(sd)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_registry_names(name):
    stem = name.replace("hq_", "sam_hq_")
    info = hub.get_checkpoint_info(name)
    assert info.filename == f"{stem}.pth"
    assert info.url == f"https://huggingface.co/lkeab/hq-sam/resolve/main/{stem}.pth"
    assert hub.get_checkpoint_info(stem) == info
