"""SAM 3 checkpoints: config inference from keys and shapes (the public layout on the meta device, the
golden file), the accepted layouts (flat / under "model", tracker keys), clear errors for damaged
files; and unit checks of the pieces written from the spec (RoIAlign, attention paths, vocabulary)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import GOLDEN, _require

SAM3 = GOLDEN / "sam3"


def _public_state_dict():
    from anyseg.config_sam3 import SAM3_PUBLIC
    from anyseg.modeling.sam3 import build_sam3

    with torch.device("meta"):
        model = build_sam3(SAM3_PUBLIC)
    sd = {"detector." + k: v for k, v in model.state_dict().items()}
    # What sam3.pt also holds: the tracker and the interactive neck, unused by the image detector.
    sd["tracker.sam_mask_decoder.iou_token.weight"] = torch.empty(1, 256, device="meta")
    sd["detector.backbone.vision_backbone.sam2_convs.0.conv_1x1.weight"] = torch.empty(256, 256, 1, 1, device="meta")
    return sd


def test_public_config_inferred_from_meta_state_dict():
    from anyseg.config_sam3 import SAM3_PUBLIC
    from anyseg.sam3_checkpoint import infer_sam3_config, is_sam3_state_dict
    from anyseg.sam2_checkpoint import is_sam2_state_dict

    sd = _public_state_dict()
    assert is_sam3_state_dict(sd) and not is_sam2_state_dict(sd)
    assert infer_sam3_config(sd) == SAM3_PUBLIC
    assert sd["detector.backbone.vision_backbone.trunk.blocks.0.mlp.fc1.weight"].shape == (4736, 1024)


@pytest.fixture(scope="module")
def golden_sd():
    from anyseg.checkpoint import read_state_dict

    return read_state_dict(_require(SAM3) / "sam3_checkpoint.pt")


def test_golden_loads_nested_with_tracker_keys(golden_sd, tmp_path):
    import anyseg
    from anyseg.modeling.sam3 import Sam3

    sd = dict(golden_sd)
    sd["tracker.no_mem_embed"] = torch.zeros(1, 1, 64)
    path = tmp_path / "sam3.pt"
    torch.save({"model": sd}, path)
    model = anyseg.load_model(path)
    assert isinstance(model, Sam3) and not model.training
    assert model.config.vit.global_att_blocks == (1, 3) and model.config.text.heads == 2
    key = "backbone.vision_backbone.trunk.blocks.0.attn.freqs_cis"
    assert torch.equal(model.state_dict()[key], golden_sd["detector." + key])
    assert model.checkpoint_dir == str(tmp_path)


def test_missing_and_misshaped_keys_are_listed(golden_sd):
    from anyseg.checkpoint import CheckpointError
    from anyseg.sam3_checkpoint import infer_sam3_config, sam3_model_from_state_dict

    sd = dict(golden_sd)
    del sd["detector.geometry_encoder.cls_embed.weight"]
    sd["detector.dot_prod_scoring.hs_proj.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        sam3_model_from_state_dict(sd, config=infer_sam3_config(golden_sd))
    text = str(err.value)
    assert "geometry_encoder.cls_embed.weight" in text and "missing keys (1)" in text
    assert "dot_prod_scoring.hs_proj.bias: file (3,) vs model (64,)" in text
    sd = {k: v for k, v in golden_sd.items() if "query_embed" not in k}
    with pytest.raises(CheckpointError, match="detector.transformer.decoder.query_embed.weight"):
        sam3_model_from_state_dict(sd)


def test_truncated_file_is_a_clear_error(tmp_path):
    import anyseg
    from anyseg.checkpoint import CheckpointError

    data = (_require(SAM3) / "sam3_checkpoint.pt").read_bytes()
    path = tmp_path / "sam3.pt"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        anyseg.load_model(path)


def test_sam1_config_inference_refuses_sam3(golden_sd):
    from anyseg.checkpoint import CheckpointError, infer_config

    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        infer_config(golden_sd)


def _roi_align_direct(feat, box, out):
    """RoIAlign (aligned=False, adaptive sampling) one sample at a time, as the spec states it."""
    c, h, w = feat.shape
    x0, y0, x1, y1 = box
    rw, rh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    bw, bh = rw / out, rh / out
    gw, gh = math.ceil(rw / out), math.ceil(rh / out)
    res = torch.zeros(c, out, out, dtype=torch.float64)
    for ph in range(out):
        for pw in range(out):
            acc = torch.zeros(c, dtype=torch.float64)
            for iy in range(gh):
                y = y0 + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    x = x0 + pw * bw + (ix + 0.5) * bw / gw
                    if y < -1 or y > h or x < -1 or x > w:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(y), int(x)
                    if yl >= h - 1:
                        yl = yh = h - 1
                        y = float(yl)
                    else:
                        yh = yl + 1
                    if xl >= w - 1:
                        xl = xh = w - 1
                        x = float(xl)
                    else:
                        xh = xl + 1
                    ly, lx = y - yl, x - xl
                    acc += ((1 - ly) * (1 - lx) * feat[:, yl, xl] + (1 - ly) * lx * feat[:, yl, xh]
                            + ly * (1 - lx) * feat[:, yh, xl] + ly * lx * feat[:, yh, xh]).double()
            res[:, ph, pw] = acc / (gh * gw)
    return res


def test_roi_align_matches_direct_sampling():
    from anyseg.modeling.sam3.roi_align import roi_align

    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 12, 10, generator=gen)
    boxes = [(1.3, 2.2, 8.7, 11.1), (-2.0, -1.5, 3.0, 4.0), (7.5, 9.0, 12.5, 13.5), (4.0, 4.0, 4.2, 4.1),
             (0.0, 0.0, 10.0, 12.0)]
    got = roi_align(feat, torch.tensor(boxes), 7)
    for g, box in zip(got, boxes):
        torch.testing.assert_close(g.double(), _roi_align_direct(feat, box, 7), atol=1e-5, rtol=0)


def test_plain_and_fused_attention_agree():
    from anyseg.modeling.sam3.attention import MultiheadAttention

    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4)
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    pad = torch.tensor([[False] * 6 + [True], [False] * 7])
    bias = torch.randn(2 * 4, 5, 7)
    fused = attn(q, k, k, key_padding_mask=pad, attn_mask=bias)
    attn.use_sdpa = False
    plain = attn(q, k, k, key_padding_mask=pad, attn_mask=bias)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    # A padded key has no influence.
    k2 = k.clone()
    k2[0, 6] = 100.0
    torch.testing.assert_close(attn(q, k2, k2, key_padding_mask=pad, attn_mask=bias)[0], plain[0])


def test_vocabulary_checks_its_digest(tmp_path, monkeypatch):
    from anyseg import sam3_tokenizer

    fake = tmp_path / sam3_tokenizer.VOCAB_FILE
    fake.write_bytes(b"not the vocabulary")
    with pytest.raises(ValueError, match="not the CLIP BPE vocabulary"):
        sam3_tokenizer.find_vocab([tmp_path])
    monkeypatch.setattr(sam3_tokenizer, "_PACKAGES", ())
    monkeypatch.delenv("ANYSEG_CLIP_BPE", raising=False)
    with pytest.raises(sam3_tokenizer.VocabularyNotFound, match="pip install --no-deps open_clip_torch"):
        sam3_tokenizer.find_vocab([tmp_path / "elsewhere"])


def test_vocabulary_found_from_installed_package():
    from anyseg.sam3_tokenizer import VOCAB_FILE, find_vocab

    assert find_vocab().name == VOCAB_FILE


def test_registry_name_and_hub_id(tmp_path, monkeypatch):
    import anyseg
    from anyseg import hub
    from anyseg.modeling.sam3 import Sam3

    monkeypatch.setenv("ANYSEG_HOME", str(tmp_path))
    monkeypatch.setenv("ANYSEG_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    info = hub.get_checkpoint_info("sam3")
    assert (info.filename, info.hf_id, info.hf_only) == ("sam3.pt", "facebook/sam3", True)
    for name in ("sam3", "facebook/sam3"):
        with pytest.raises((FileNotFoundError, ImportError), match=r"checkpoints/sam3\.pt"):
            hub.resolve_checkpoint(name)
    dest = tmp_path / "checkpoints" / "sam3.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(_require(SAM3) / "sam3_checkpoint.pt")
    assert hub.resolve_checkpoint("facebook/sam3") == dest
    assert isinstance(anyseg.load_model("sam3"), Sam3)
