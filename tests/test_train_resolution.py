"""Running a ViT checkpoint at another input size: resampled position tables, `--img-size` in
`anyseg train` and `anyseg eval`, and the exported model keeping the new size."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from anyseg import load_model, save_model
from anyseg.checkpoint import read_state_dict
from anyseg.cli import main
from anyseg.config import SamConfig, TinyViTConfig
from anyseg.modeling.sam import build_sam
from anyseg.train.config import ARCHS, TrainConfig
from anyseg.resolution import resize_state_dict
from anyseg.train.trainer import Trainer

ENC = "image_encoder."
# ARCHS["tiny"]: 16 px patches at 128 px (an 8 x 8 grid), window 4, global attention in block 1.
TINY = ARCHS["tiny"]
DATA = "synthetic:count=3,seed=5,size=96,objects=1-2"


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_sam(TINY).eval()
    with torch.no_grad():  # non-trivial position tables (zeros would hide resampling mistakes)
        for name, p in model.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_()
    return save_model(model, tmp_path / "tiny.pth")


def test_resize_state_dict_shapes_and_unchanged_tensors(tiny_checkpoint):
    sd = read_state_dict(tiny_checkpoint)
    out = resize_state_dict(sd, 64)
    assert out[ENC + "pos_embed"].shape == (1, 4, 4, TINY.encoder.embed_dim)
    head_dim = TINY.encoder.embed_dim // TINY.encoder.num_heads
    assert out[ENC + "blocks.1.attn.rel_pos_h"].shape == (7, head_dim)  # global block: 2 g - 1
    assert torch.equal(out[ENC + "blocks.0.attn.rel_pos_h"], sd[ENC + "blocks.0.attn.rel_pos_h"])  # windowed
    for key in sd:
        if "pos_embed" not in key and "blocks.1.attn.rel_pos" not in key:
            assert out[key] is sd[key]
    same = resize_state_dict(sd, 128)
    assert all(torch.equal(same[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        resize_state_dict(sd, 100)


def test_constant_position_table_stays_constant(tiny_checkpoint):
    sd = dict(read_state_dict(tiny_checkpoint))
    pos = torch.zeros_like(sd[ENC + "pos_embed"]) + torch.linspace(-1, 1, sd[ENC + "pos_embed"].shape[-1])
    sd[ENC + "pos_embed"] = pos
    for size in (64, 256):
        out = resize_state_dict(sd, size)[ENC + "pos_embed"]
        assert torch.allclose(out, pos[:, :1, :1].expand_as(out), atol=1e-5)


def test_resampled_relative_tables_equal_what_attention_does_on_the_fly(tiny_checkpoint):
    """The global block's tables are resampled exactly as attention resamples a table of the wrong
    length, so only the absolute position table changes the computation."""
    sd = read_state_dict(tiny_checkpoint)
    small = load_model(tiny_checkpoint, img_size=64)
    assert small.img_size == 64 and small.prompt_encoder.image_embedding_size == (4, 4)
    assert small.prompt_encoder.mask_input_size == (16, 16)
    on_the_fly = build_sam(replace(TINY, encoder=replace(TINY.encoder, img_size=64))).eval()
    attn = on_the_fly.image_encoder.blocks[1].attn
    attn.rel_pos_h = torch.nn.Parameter(sd[ENC + "blocks.1.attn.rel_pos_h"].clone())
    attn.rel_pos_w = torch.nn.Parameter(sd[ENC + "blocks.1.attn.rel_pos_w"].clone())
    keep = {k: v for k, v in resize_state_dict(sd, 64).items() if "blocks.1.attn.rel_pos" not in k}
    on_the_fly.load_state_dict({**keep, ENC + "blocks.1.attn.rel_pos_h": attn.rel_pos_h.data,
                                ENC + "blocks.1.attn.rel_pos_w": attn.rel_pos_w.data})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = small.encode_image(x), on_the_fly.encode_image(x)
    assert a.shape == (1, TINY.encoder.out_chans, 4, 4)
    assert torch.allclose(a, b, atol=1e-5)


def test_saved_resized_model_loads_at_its_size(tiny_checkpoint, tmp_path):
    # 96 px: a 6 x 6 grid, so the global block's tables (length 11) differ from the windowed ones (7)
    small = load_model(tiny_checkpoint, img_size=96)
    path = save_model(small, tmp_path / "small.pth")
    again = load_model(path)
    assert again.img_size == 96
    assert again.config.encoder.global_attn_indexes == TINY.encoder.global_attn_indexes
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in small.state_dict().items())
    assert load_model(path, img_size=96).img_size == 96  # its own size: unchanged
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(small.encode_image(x), again.encode_image(x))
    with pytest.raises(ValueError, match="positive"):
        load_model(tiny_checkpoint, img_size=0)


def test_tiny_vit_checkpoints_are_built_for_the_size(tmp_path):
    config = SamConfig(encoder=TinyViTConfig(embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                             window_sizes=(4, 4, 4, 4), img_size=128, out_chans=32, num_classes=10),
                       prompt=TINY.prompt, decoder=TINY.decoder)
    path = save_model(build_sam(config), tmp_path / "tv.pth")
    assert load_model(path, img_size=256).img_size == 256


def test_train_and_eval_with_img_size(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_checkpoint), "--img-size", "64", "--mode", "decoder", "--data", DATA,
            "--steps", "2", "--batch-size", "1", "--masks-per-image", "2", "--point-iters", "0",
            "--refine-iters", "0", "--loss-res", "low", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    trained = load_model(out / "model.pth")
    assert trained.img_size == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["img_size"] == 64
    # resuming the run at another size is refused
    with pytest.raises(ValueError, match="img_size: 64 -> 128"):
        Trainer(TrainConfig(model=str(tiny_checkpoint), img_size=128, data=DATA, steps=2, output=str(out)),
                progress=False)
    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_checkpoint), "--img-size", "64", "--data", DATA, "--clicks", "1",
                 "-o", str(ev), "--name", "before", "--quiet", "--device", "cpu"]) == 0
    assert json.loads((ev / "before.json").read_text())["img_size"] == 64
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", DATA, "--clicks", "1", "-o", str(ev),
                 "--name", "native", "--quiet", "--device", "cpu"]) == 0
    assert json.loads((ev / "native.json").read_text())["img_size"] == 128
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_checkpoint), "--img-size", "0", "--data", DATA]) == 2
    assert "--img-size must be a positive" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_checkpoint), "--img-size", "-64", "--data", DATA,
                 "-o", str(tmp_path / "bad")]) == 2
    assert "--img-size must be a positive" in capsys.readouterr().err
