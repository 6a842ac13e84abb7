"""SAM 2 fast paths (anyseg.speed, anyseg.fast.sam2) against the faithful path on the golden checkpoint.

Tolerances: lossless paths keep the golden ones of ``../shared/golden/sam2/README.md`` (features 1e-3,
IoU scores 5e-4, low-res logits 0.01 + 1e-3 relative, mask IoU >= 0.999), checked both against the
golden outputs and against the faithful path; reduced precision keeps the quality bar of
``docs/speed.md`` (mask IoU >= 0.98 against the faithful path on every case).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks

SAM2 = GOLDEN / "sam2"

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _native_bf16() -> bool:
    from anyseg.speed import cpu_capabilities

    return cpu_capabilities()["bf16_matmul"]


# bfloat16 on a CPU without native bfloat16 is emulated (slow, and not what `auto` would pick there);
# ANYSEG_TEST_BF16=1 runs these tests anyway (the quality they check does not depend on the kernels).
BF16 = pytest.mark.skipif(not (_native_bf16() or os.environ.get("ANYSEG_TEST_BF16") == "1"),
                          reason="this CPU has no native bfloat16 (AMX / AVX512-BF16); ANYSEG_TEST_BF16=1 forces it")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((_require(SAM2) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model():
    import anyseg

    return anyseg.load_model(_require(SAM2) / "sam2.1_golden.pt")


@pytest.fixture(autouse=True)
def _faithful_after(request):
    yield
    if "model" in request.fixturenames:
        from anyseg.speed import SpeedConfig, apply

        apply(request.getfixturevalue("model"), SpeedConfig.faithful())


def _rgb(name):
    return np.array(Image.open(_require(IMAGES) / name).convert("RGB"))


def _args(args, golden):
    out = {}
    for key, value in args.items():
        if key == "mask_input":
            out[key] = golden[value].astype(np.float32)
        elif isinstance(value, list):
            out[key] = np.array(value)
        else:
            out[key] = value
    return out


def _close(got, want, atol, rtol=0.0, what=""):
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    assert excess.max() <= 0, f"{what}: worst excess {excess.max():.3g} (max diff {np.abs(got - want).max():.3g})"


def _min_iou(got, want) -> float:
    got = np.asarray(got).reshape(-1, *np.shape(got)[-2:]) > 0
    want = np.asarray(want).reshape(-1, *np.shape(want)[-2:]) > 0
    return min(mask_iou(a, b) for a, b in zip(got, want))


def _run_cases(model, entry, golden, image):
    """Every predictor case of the manifest for one image: features and outputs."""
    from anyseg import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    feats = {"image_embed": predictor.get_image_embedding(), "high_res_s0": predictor._features["high_res_feats"][0],
             "high_res_s1": predictor._features["high_res_feats"][1]}
    outs = {case["name"]: predictor.predict(**_args(case["args"], golden)) for case in entry["cases"]}
    return feats, outs


def _check_against_golden(feats, outs, entry, golden, tol):
    for key, tensor in feats.items():
        idx = golden[f"sample_idx_{tensor.shape[-1]}"]
        _close(tensor[..., idx, :][..., idx].float().numpy(), golden[f"{key}_sampled"], tol["features_atol"], what=key)
    for case in entry["cases"]:
        name = case["name"]
        masks, iou, low = outs[name]
        assert masks.dtype == np.float32 and iou.dtype == np.float32 and low.dtype == np.float32
        want = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
        assert masks.shape == want.shape, name
        assert _min_iou(masks, want) >= tol["mask_iou"], name
        _close(iou, golden[f"{name}_iou"], tol["iou_atol"], what=f"{name} iou")
        _close(low[..., ::4, ::4], golden[f"{name}_low_res_sampled"], tol["logits_atol"], tol["logits_rtol"],
               what=f"{name} low-res")
        if name == "logits":
            _close(masks[..., ::16, ::16], golden["logits_logits_sampled"], tol["logits_atol"], tol["logits_rtol"],
                   what="return_logits")
        else:
            assert set(np.unique(masks)) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------ lossless
@pytest.mark.golden
@pytest.mark.parametrize("index", [0, 1], ids=["truck", "dog"])
def test_lossless_keeps_golden_tolerances(index, manifest, model):
    """speed="lossless" (SDPA in Hiera and the decoder, oneDNN encoder layers, composed neck projections,
    the fast decoder with its per-image cache, the banded resize) against the golden outputs."""
    from anyseg.speed import SpeedConfig, apply, get_config

    entry = manifest["image"][index]
    golden = np.load(SAM2 / entry["file"])
    apply(model, SpeedConfig.lossless())
    feats, outs = _run_cases(model, entry, golden, _rgb(entry["image"]))
    _check_against_golden(feats, outs, entry, golden, manifest["tolerances"]["image"])
    apply(model, SpeedConfig.faithful())
    assert get_config(model) is None and model.speed_runtime is None
    assert not any(getattr(m, "fused", False) for m in model.modules())


@pytest.mark.golden
@pytest.mark.parametrize("field", ["fused_attention", "fast_decoder", "fast_postprocess", "onednn_encoder"])
def test_each_lossless_path_alone_matches_faithful(field, manifest, model):
    """Each switch on its own, on dog.jpg, against the faithful path within the golden tolerances."""
    from anyseg.speed import SpeedConfig, apply

    entry = manifest["image"][1]
    golden = np.load(SAM2 / entry["file"])
    tol = manifest["tolerances"]["image"]
    image = _rgb(entry["image"])
    apply(model, SpeedConfig.faithful())
    want_feats, want = _run_cases(model, entry, golden, image)
    apply(model, SpeedConfig(**{field: True}))
    got_feats, got = _run_cases(model, entry, golden, image)
    for key in want_feats:
        _close(got_feats[key].numpy(), want_feats[key].numpy(), tol["features_atol"], what=key)
    for name, (masks, iou, low) in got.items():
        masks0, iou0, low0 = want[name]
        assert _min_iou(masks, masks0) >= tol["mask_iou"], name
        _close(iou, iou0, tol["iou_atol"], what=name)
        _close(low, low0, tol["logits_atol"], tol["logits_rtol"], what=name)


@pytest.mark.golden
def test_lossless_predict_batch_keeps_golden_tolerances(manifest, model):
    """set_image_batch + predict_batch with the fast paths (one fast decoder per image, made on use)."""
    from anyseg import SAM2ImagePredictor
    from anyseg.speed import SpeedConfig, apply

    spec = manifest["predict_batch"]
    tol = manifest["tolerances"]["image"]
    golden = np.load(SAM2 / spec["file"])
    apply(model, SpeedConfig.lossless())
    predictor = SAM2ImagePredictor(model)
    predictor.set_image_batch([_rgb(name) for name in spec["images"]])
    boxes = [None if b is None else np.array(b) for b in spec["box_batch"]]
    masks, ious, lows = predictor.predict_batch([np.array(c) for c in spec["point_coords_batch"]],
                                                [np.array(l) for l in spec["point_labels_batch"]],
                                                box_batch=boxes, multimask_output=spec["multimask_output"])
    for i in range(len(spec["images"])):
        want = unpack_masks(golden[f"batch{i}_masks_packed"], golden[f"batch{i}_masks_shape"])
        assert _min_iou(masks[i], want) >= tol["mask_iou"]
        _close(ious[i], golden[f"batch{i}_iou"], tol["iou_atol"], what=f"batch{i} iou")
        _close(lows[i][..., ::4, ::4], golden[f"batch{i}_low_res_sampled"], tol["logits_atol"], tol["logits_rtol"],
               what=f"batch{i} low-res")


@pytest.mark.golden
def test_load_model_speed_presets_for_sam2():
    import anyseg
    from anyseg.fast.sam2 import Sam2FastEncoder
    from anyseg.speed import SpeedConfig, get_config

    path = _require(SAM2) / "sam2.1_golden.pt"
    model = anyseg.load_model(path, speed="lossless")
    assert get_config(model) == SpeedConfig.lossless()
    assert isinstance(model.speed_runtime.encoder, Sam2FastEncoder)
    assert model.speed_runtime.encoder.trunk is not model.image_encoder.trunk  # the oneDNN copy (small model)
    assert get_config(anyseg.load_model(path, speed="auto")) == SpeedConfig.auto("cpu")
    assert get_config(anyseg.load_model(path, speed="faithful")) is None


# ----------------------------------------------------------------------------------- components
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("batch,chunk", [(1, 16), (3, 2)])
def test_fast_decoder_matches_sam2_decoder(model, multimask, with_mask, batch, chunk):
    """Sam2FastDecoder against Sam2MaskDecoder.forward: random features, points and mask prompts, the
    dynamic fallback (single mask), several prompts and chunked upscaling."""
    from anyseg.fast.sam2 import Sam2FastDecoder

    torch.manual_seed(0)
    prompt, dec = model.sam_prompt_encoder, model.sam_mask_decoder
    embed = torch.randn(1, 256, 64, 64)
    high = (torch.randn(1, 32, 256, 256), torch.randn(1, 64, 128, 128).contiguous(memory_format=torch.channels_last))
    coords = torch.rand(batch, 2, 2) * 1024
    labels = torch.tensor([[1, 0]]).repeat(batch, 1)
    mask = torch.randn(batch, 1, 256, 256) * 4 if with_mask else None
    with torch.inference_mode():
        sparse, dense = model.embed_prompts((coords, labels), mask)
        want = dec(embed, prompt.get_dense_pe(), sparse, dense, multimask, high_res_features=high)
        fast = Sam2FastDecoder(dec, prompt.get_dense_pe(), prompt.no_mask_embed.weight, upscale_chunk=chunk,
                               mask_projection=prompt.mask_projection)
        fast.set_image(embed, high_res=high)
        hidden = prompt.mask_features(mask) if with_mask else None
        masks, iou = fast(sparse, None, multimask, mask_hidden=hidden)
    assert masks.shape == want.masks.shape and iou.shape == want.iou.shape
    torch.testing.assert_close(iou, want.iou, atol=5e-5, rtol=0)
    torch.testing.assert_close(masks, want.masks, atol=2e-3, rtol=1e-4)


def test_fast_decoder_needs_high_res_features(model):
    from anyseg.fast.sam2 import Sam2FastDecoder

    prompt = model.sam_prompt_encoder
    fast = Sam2FastDecoder(model.sam_mask_decoder, prompt.get_dense_pe(), prompt.no_mask_embed.weight)
    with pytest.raises(ValueError, match="high-resolution"):
        fast.set_image(torch.randn(1, 256, 64, 64))


def _small_model(**overrides):
    """A random SAM 2 with a small Hiera (fast to run), the zero-initialised embeddings perturbed."""
    from anyseg.config_sam2 import HieraConfig, NeckConfig, sam2_config
    from anyseg.modeling.sam2 import build_sam2_model

    trunk = HieraConfig(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,))
    config = replace(sam2_config("t"), trunk=trunk, neck=NeckConfig(backbone_channel_list=trunk.channel_list),
                     **overrides)
    torch.manual_seed(0)
    model = build_sam2_model(config).eval()
    with torch.no_grad():
        for p in (model.image_encoder.trunk.pos_embed, model.image_encoder.trunk.pos_embed_window, model.no_mem_embed):
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("high_res", [True, False])
def test_fast_encoder_matches_encode_image(high_res):
    """The composed neck / high-res projections, cached position embedding and channels-last patch
    embedding against Sam2.encode_image (also for a decoder without high-resolution features)."""
    from anyseg.fast.sam2 import encode
    from anyseg.speed import SpeedConfig, apply

    model = _small_model(use_high_res_features_in_sam=high_res)
    x = torch.randn(2, 3, 1024, 1024)
    with torch.inference_mode():
        want = model.encode_image(x)
        apply(model, SpeedConfig.lossless())
        got = encode(model, x)
        again = encode(model, x)  # the kept position embedding and composed weights
    assert len(got.high_res) == len(want.high_res) == 2
    for a, b in zip((got.vision, *got.high_res, again.vision), (want.vision, *want.high_res, want.vision)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.vision_pos, want.vision_pos)


def test_fast_encoder_follows_weight_updates():
    """The kept position embedding and composed projections are made again when a weight changes."""
    from anyseg.fast.sam2 import encode
    from anyseg.speed import SpeedConfig, apply

    model = apply(_small_model(), SpeedConfig.lossless())
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        encode(model, x)
        model.image_encoder.trunk.pos_embed.add_(0.5)
        model.sam_mask_decoder.conv_s0.weight.mul_(2.0)
        model.image_encoder.neck.convs[2].conv.bias.add_(1.0)
        got = encode(model, x)
        apply(model, SpeedConfig.faithful())
        want = model.encode_image(x)
    for a, b in zip((got.vision, *got.high_res), (want.vision, *want.high_res)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(534, 800), (1200, 1800), (37, 19), (256, 256)])
def test_direct_resizer_matches_bilinear(size):
    from anyseg.fast.resize import MaskResizer

    logits = torch.randn(2, 3, 256, 256) * 8
    want = F.interpolate(logits, size, mode="bilinear", align_corners=False)
    resizer = MaskResizer.direct(256, size)
    torch.testing.assert_close(resizer(logits), want, atol=2e-3, rtol=1e-5)
    assert (resizer(logits, 0.0) != (want > 0)).float().mean() < 1e-4


def test_speed_encode_rejects_sam2():
    from anyseg.speed import SpeedConfig, apply, encode

    model = apply(_small_model(), SpeedConfig.lossless())
    with pytest.raises(TypeError, match="SAM 2"):
        encode(model, torch.zeros(1, 3, 1024, 1024))


# ----------------------------------------------------------------------------- reduced precision
@BF16
@pytest.mark.golden
@pytest.mark.parametrize("cast", [False, True], ids=["autocast", "cast"])
def test_bf16_encoder_keeps_quality_bar(manifest, model, cast):
    """A bfloat16 Hiera trunk (what `auto` picks on CPUs with native bfloat16; neck and decoder stay
    float32): mask IoU >= 0.98 against the faithful path on every predictor case of both images."""
    from anyseg.speed import SpeedConfig, apply

    worst = {}
    for entry in manifest["image"]:
        golden = np.load(SAM2 / entry["file"])
        image = _rgb(entry["image"])
        apply(model, SpeedConfig.faithful())
        _, want = _run_cases(model, entry, golden, image)
        apply(model, SpeedConfig.lossless(encoder_dtype=torch.bfloat16, encoder_cast=cast))
        _, got = _run_cases(model, entry, golden, image)
        for name, (masks, iou, _) in got.items():
            worst[f"{entry['image']}:{name}"] = _min_iou(masks, want[name][0])
            assert np.abs(iou - want[name][1]).max() < 0.02, name
    assert min(worst.values()) >= 0.98, worst


def test_auto_on_cpu_picks_bf16_only_with_native_bf16():
    from anyseg.speed import SpeedConfig

    config = SpeedConfig.auto("cpu")
    assert config.encoder_dtype == (torch.bfloat16 if _native_bf16() else None)
    assert config.fused_attention and config.fast_decoder and config.fast_postprocess


# -------------------------------------------------------------------------------------------- GPU
@CUDA
@pytest.mark.golden
def test_gpu_auto_matches_cpu_faithful(manifest, model):
    """`auto` on CUDA (a float16 copy of the trunk, float32 neck and decoder) against the CPU faithful
    path: mask IoU >= 0.98."""
    import anyseg
    from anyseg import SAM2ImagePredictor
    from anyseg.speed import SpeedConfig, apply

    entry = manifest["image"][1]
    golden = np.load(SAM2 / entry["file"])
    image = _rgb(entry["image"])
    apply(model, SpeedConfig.faithful())
    _, want = _run_cases(model, entry, golden, image)
    gpu = anyseg.load_model(_require(SAM2) / "sam2.1_golden.pt", device="cuda", speed="auto")
    _, got = _run_cases(gpu, entry, golden, image)
    for name, (masks, _, _) in got.items():
        assert _min_iou(masks, want[name][0]) >= 0.98, name
    assert isinstance(SAM2ImagePredictor(gpu).model, type(model))


# ---------------------------------------------------------------------------------------- bench
@pytest.mark.golden
def test_bench_sam2_rows_on_a_checkpoint():
    """`anyseg bench`'s SAM 2 rows on a checkpoint file: encode and click, faithful vs lossless, medians
    of alternated repeats, the CPU kind in the header."""
    from anyseg.fast.benchmark import run_benchmark

    out = run_benchmark(tasks=["sam2_encode", "sam2_click"], quick=True, devices=["cpu"], repeats=1,
                        sam2_model_spec=str(_require(SAM2) / "sam2.1_golden.pt"),
                        only_configs=["faithful", "reference", "lossless"], log=lambda s: None)
    result = out["results"][0]
    rows = result["rows"]
    assert [(r["task"], r["config"]) for r in rows] == [
        (task, config) for task in ("sam2_encode", "sam2_click") for config in ("faithful", "reference", "lossless")]
    assert all(r["wall"] > 0 and r["model"] == "sam2.1_golden" for r in rows)
    # Speed-ups are against what the reference code computes (SDPA attention), not anyseg's faithful path.
    assert all(r["speedup_base"] == "reference" for r in rows)
    for r in rows:
        base = next(b for b in rows if b["task"] == r["task"] and b["config"] == "reference")
        assert r["speedup"] == pytest.approx(base["wall"] / r["wall"])
    assert "scaled_dot_product_attention" in next(r for r in rows if r["config"] == "reference")["describe"]
    assert "AVX512-BF16" in result["markdown"] and "sam2_click [sam2.1_golden]" in result["markdown"]
    assert not result["meta"]["failures"]


def test_bench_reference_configuration_fuses_every_attention(model):
    """The bench's ``reference`` state runs the faithful modules with every attention fused, as the
    reference code does; switching back to ``faithful`` restores the explicit softmax."""
    from anyseg.fast.benchmark import SAM2_REFERENCE, _SpeedStates, sam2_speed_configs

    configs = {k: v for k, v in sam2_speed_configs(torch.device("cpu")).items() if k in ("faithful", SAM2_REFERENCE)}
    states = _SpeedStates(model, configs, fused=(SAM2_REFERENCE,))
    flagged = [m for m in model.modules() if hasattr(m, "fused")]
    assert len(flagged) >= len(model.image_encoder.trunk.blocks)
    try:
        states.use(SAM2_REFERENCE)
        assert all(m.fused for m in flagged) and getattr(model, "speed_runtime", None) is None
        states.use("faithful")
        assert not any(m.fused for m in flagged)
    finally:
        states.close()


def test_bench_cli_checks_sam2_model_arguments():
    from anyseg.cli.bench import main

    assert main(["--tasks", "sam2_click", "--random-weights"]) == 2
    assert main(["--tasks", "sam2_click", "--model", "sam2.1_hiera_q", "--random-weights", "--repeats", "1",
                 "--configs", "faithful"]) == 2
    from anyseg.fast.benchmark import sam2_model

    with pytest.raises(ValueError, match="unknown SAM 2 model"):
        sam2_model("sam2.1_hiera_q", torch.device("cpu"), True)
    with pytest.raises(ValueError, match="random-weights"):
        sam2_model(str(_require(SAM2) / "sam2.1_golden.pt"), torch.device("cpu"), True)
