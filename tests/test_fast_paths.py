"""Fast paths (anyseg.speed / anyseg.fast) against the faithful path and the golden data."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anyseg
from anyseg.config import MaskDecoderConfig
from anyseg.fast.amg import rle_counts_on_device
from anyseg.fast.decoder import FastDecoder
from anyseg.fast.quality import match_records, predictor_cases
from anyseg.fast.resize import MaskResizer
from anyseg.masks import rle_counts
from anyseg.modeling.mask_decoder import MaskDecoder
from anyseg.speed import SpeedConfig, apply, get_config
from conftest import check_golden_outputs, golden_prompt_kwargs, mask_iou

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------- config
def test_config_presets_and_validation():
    assert SpeedConfig.faithful().is_faithful and SpeedConfig.faithful().describe() == "faithful"
    lossless = SpeedConfig.lossless()
    assert not lossless.is_faithful and lossless.encoder_dtype is None and lossless.fast_decoder
    assert SpeedConfig(encoder_dtype="bf16").encoder_dtype == torch.bfloat16
    assert SpeedConfig.auto("cuda").amg_device_masks
    with pytest.raises(ValueError, match="dtype"):
        SpeedConfig(encoder_dtype="int4")
    with pytest.raises(ValueError, match="amg_points_per_batch"):
        SpeedConfig(amg_points_per_batch=0)


def test_apply_sets_switches_and_faithful_restores():
    from anyseg.config import SamConfig, TinyViTConfig
    from anyseg.modeling.sam import build_sam

    model = build_sam(SamConfig(encoder=TinyViTConfig(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                                                      num_heads=(1, 1, 1, 2), img_size=256)))
    keys = list(model.state_dict())
    apply(model, SpeedConfig.lossless())
    flags = [m.fused for m in model.modules() if hasattr(m, "fused")]
    assert flags and all(flags) and all(m.fold_bn for m in model.modules() if hasattr(m, "fold_bn"))
    assert get_config(model) == SpeedConfig.lossless()
    assert list(model.state_dict()) == keys  # no new or renamed parameters
    apply(model, SpeedConfig.faithful())
    assert get_config(model) is None and not any(m.fused for m in model.modules() if hasattr(m, "fused"))
    with pytest.raises(ValueError, match="SpeedConfig"):
        apply(model, "fast")


# ------------------------------------------------------------------------------------ components
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
# upscaled in pieces / in one piece; 12 prompts: per-head image-to-token logits instead of block-diagonal
@pytest.mark.parametrize("chunk,batch", [(2, 3), (16, 3), (16, 12)])
def test_fast_decoder_matches_mask_decoder(multimask, with_mask, chunk, batch):
    torch.manual_seed(0)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    for p in dec.parameters():  # non-trivial weights
        p.data.add_(torch.randn_like(p) * 0.05)
    emb = torch.randn(1, 256, 16, 16)
    pe = torch.randn(1, 256, 16, 16)
    no_mask = torch.randn(1, 256)
    sparse = torch.randn(batch, 4, 256)
    dense = (torch.randn(batch, 256, 16, 16) if with_mask
             else no_mask.view(1, -1, 1, 1).expand(batch, -1, 16, 16))
    with torch.inference_mode():
        want_masks, want_iou = dec(emb, pe, sparse, dense, multimask)
        fast = FastDecoder(dec, pe, no_mask, upscale_chunk=chunk)
        got_masks, got_iou = fast(sparse, dense if with_mask else None, multimask, embedding=emb)
    assert got_masks.shape == want_masks.shape and got_iou.shape == want_iou.shape
    scale = want_masks.abs().max().item()
    assert (got_masks - want_masks).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert (got_iou - want_iou).abs().max().item() <= 1e-4


def test_cpu_predictor_upscales_in_chunks_below_the_mmap_threshold():
    """On a CPU the predictor's fast decoder upscales CPU_UPSCALE_CHUNK prompts at a time, whose
    ``B x 4h x 4w x C/8`` float32 temporaries for SAM's decoder (64 x 64 grid, C = 256) stay below the
    size that glibc maps afresh for every block even with keep_freed_memory."""
    from anyseg.fast.decoder import CPU_UPSCALE_CHUNK
    from anyseg.speed import MMAP_THRESHOLD

    per_prompt = (4 * 64) ** 2 * (256 // 8) * 4
    assert CPU_UPSCALE_CHUNK * per_prompt < MMAP_THRESHOLD
    predictor = anyseg.SamPredictor(anyseg.load_model("nano"))
    predictor.set_image(np.zeros((32, 48, 3), np.uint8))
    assert predictor.fast_decoder().upscale_chunk == CPU_UPSCALE_CHUNK


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (8, 8)])
def test_fused_vit_attention_in_query_blocks_matches_faithful(size):
    """Fused global attention with relative positions runs in query blocks (``query_chunk``): the same
    outputs as the explicit softmax, including a last partial block and a grid below one block."""
    from anyseg.modeling.vit import Attention

    torch.manual_seed(2)
    attn = Attention(64, num_heads=4, qkv_bias=True, use_rel_pos=True, grid=max(size)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    attn.query_chunk = 300  # 1024 and 960 tokens: several blocks and a partial one
    x = torch.randn(2, *size, 64)
    with torch.inference_mode():
        want = attn(x)
        attn.fused = True
        got = attn(x)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_fast_decoder_final_attention_per_token_range():
    """Segment-everything runs the final attention for the IoU token alone, then for the mask tokens of
    the prompts that pass: the same outputs as running it for all of them at once."""
    torch.manual_seed(3)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    emb, pe, no_mask = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8), torch.randn(1, 256)
    sparse = torch.randn(4, 2, 256)
    with torch.inference_mode():
        fast = FastDecoder(dec, pe, no_mask)
        iou, mask_tokens, keys = fast.tokens(sparse, embedding=emb)
        queries, tokens, keys2 = fast.transformer(sparse)
        iou_first = dec.iou_prediction_head(fast.final(queries, tokens, keys2, 0, 1)[:, 0])
        rest = fast.final(queries[1:3], tokens[1:3], keys2[1:3], 1, 1 + dec.num_mask_tokens)
    assert torch.allclose(iou_first, iou, atol=1e-5)
    assert torch.allclose(rest, mask_tokens[1:3], atol=1e-5)
    assert torch.equal(keys2, keys)


@pytest.mark.parametrize("batch", [1, 3, 12])  # 12: per-head image-to-token logits (not block-diagonal)
def test_fast_decoder_mask_prompt_through_the_cache(batch):
    """A mask prompt given before its last 1 x 1 layer (``mask_hidden``) goes through the per-image
    cache: the same masks as the faithful decoder given the full dense embedding, one mask per prompt;
    ``mask_present`` 0 gives the no-mask answer. Misuse is refused with a clear message."""
    torch.manual_seed(4)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    for p in dec.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    conv = torch.nn.Conv2d(16, 256, kernel_size=1)
    emb, pe, no_mask = torch.randn(1, 256, 12, 12), torch.randn(1, 256, 12, 12), torch.randn(1, 256)
    sparse, hidden = torch.randn(batch, 3, 256), torch.randn(batch, 16, 12, 12)
    with torch.inference_mode():
        want_masks, want_iou = dec(emb, pe, sparse, conv(hidden), True)
        fast = FastDecoder(dec, pe, no_mask, mask_projection=conv)
        got_masks, got_iou = fast(sparse, None, True, embedding=emb, mask_hidden=hidden)
        none_masks, none_iou = dec(emb, pe, sparse, no_mask.view(1, -1, 1, 1).expand(batch, -1, 12, 12), True)
        iou, mask_tokens, image_tokens = fast.tokens(sparse, mask_hidden=hidden, mask_present=torch.zeros(1))
        absent = fast.masks(mask_tokens, image_tokens, [1, 2, 3])
        with pytest.raises(ValueError, match="not both"):
            fast(sparse, conv(hidden), True, mask_hidden=hidden)
        with pytest.raises(ValueError, match="B x 16 x 12 x 12"):
            fast(sparse, None, True, mask_hidden=hidden[..., :6])
        with pytest.raises(ValueError, match="mask_projection"):
            FastDecoder(dec, pe, no_mask)(sparse, None, True, embedding=emb, mask_hidden=hidden)
        with pytest.raises(ValueError, match="1 x 1 Conv2d"):
            FastDecoder(dec, pe, no_mask, mask_projection=torch.nn.Conv2d(16, 256, kernel_size=2))
    tol = 1e-4 * max(1.0, want_masks.abs().max().item())
    assert got_masks.shape == want_masks.shape and (got_masks - want_masks).abs().max().item() <= tol
    assert (got_iou - want_iou).abs().max().item() <= 1e-4
    assert (absent - none_masks).abs().max().item() <= tol
    assert (iou[:, 1:] - none_iou).abs().max().item() <= 1e-4
    assert (got_masks - none_masks).abs().max().item() > 100 * tol  # the mask prompt does change the answer


def test_fast_decoder_follows_weight_updates():
    """The re-laid-out upscaling and hypernetwork weights a FastDecoder keeps between calls are made
    again when the decoder's parameters change in place (an optimiser step, load_state_dict)."""
    torch.manual_seed(2)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    emb, pe, no_mask = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8), torch.randn(1, 256)
    sparse = torch.randn(2, 3, 256)
    dense = no_mask.view(1, -1, 1, 1).expand(2, -1, 8, 8)
    fast = FastDecoder(dec, pe, no_mask)
    with torch.inference_mode():
        before = fast(sparse, None, True, embedding=emb)[0]
    with torch.no_grad():
        for p in list(dec.output_upscaling.parameters()) + list(dec.output_hypernetworks_mlps.parameters()):
            p.mul_(1.5).add_(0.1)
    with torch.inference_mode():
        got = fast(sparse, None, True, embedding=emb)[0]
        want = dec(emb, pe, sparse, dense, True)[0]
    tol = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= tol
    assert (before - want).abs().max().item() > 100 * tol  # the update did change the answer


def test_reduced_precision_decoder_through_the_fast_decoder():
    """``decoder_dtype`` (autocast) with the fast decoder on a CPU: a click runs (the in-place updates of
    the float32 path must not meet autocast's bfloat16 products) and stays near the float32 answer,
    and segment-everything runs too."""
    model = anyseg.load_model("nano")
    image = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    point, label = np.array([[80.0, 60.0]]), np.array([1])
    out = {}
    for name, config in (("float32", SpeedConfig.lossless()), ("bf16", SpeedConfig.lossless(decoder_dtype="bf16"))):
        apply(model, config)
        predictor = anyseg.SamPredictor(model)
        predictor.set_image(image)
        out[name] = predictor.predict(point, label)
    assert anyseg.MaskGenerator(model, points_per_side=4).generate(image) is not None
    apply(model, SpeedConfig.faithful())
    (masks, scores, low), (masks16, scores16, low16) = out["float32"], out["bf16"]
    assert scores16.dtype == np.float32 and low16.dtype == np.float32
    assert np.abs(low16 - low).max() <= 0.05 * np.abs(low).max()  # bfloat16 rounding, not a wrong answer
    assert np.abs(scores16 - scores).max() <= 0.02
    assert min(mask_iou(a, b) for a, b in zip(masks, masks16)) >= 0.95


def mask_tokens_of(fast, queries, tokens, keys):
    return fast.final(queries, tokens, keys, 1, 1 + fast.decoder.num_mask_tokens)


@pytest.mark.parametrize("with_mask", [False, True])
def test_fast_decoder_low_rank_upscaling_matches_dense(with_mask):
    """On a CPU the upscaling's first layer reads the image tokens as the cached keys plus per-prompt
    low-rank terms (LowRankImage): the same low-res logits as from the dense image tokens, in one piece
    and in chunks, for selected prompts, and with a mask prompt through the cache. Where it does not
    apply (a dense mask prompt, autograd on) the transformer hands back None."""
    torch.manual_seed(5)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    for p in dec.parameters():  # layer norms with weights far from 1 and biases far from 0
        p.data.add_(torch.randn_like(p) * 0.3)
    conv = torch.nn.Conv2d(16, 256, kernel_size=1)
    emb, pe, no_mask = torch.randn(1, 256, 12, 12), torch.randn(1, 256, 12, 12), torch.randn(1, 256)
    sparse, hidden = torch.randn(5, 3, 256), torch.randn(5, 16, 12, 12)
    mask = {"mask_hidden": hidden} if with_mask else {}
    with torch.inference_mode():
        fast = FastDecoder(dec, pe, no_mask, mask_projection=conv, upscale_chunk=2)
        fast.set_image(emb)
        queries, tokens, keys, low_rank = fast.transformer(sparse, low_rank=True, **mask)
        assert torch.equal(keys, fast.transformer(sparse, **mask)[2])  # the tokens themselves are unchanged
        pick = torch.tensor([4, 1])
        got_some = fast.masks(mask_tokens_of(fast, queries, tokens, keys)[pick], keys[pick], [0, 2],
                              low_rank=low_rank.select(pick))
        terms = low_rank.terms()
        assert terms.z.shape[:2] == (5, 144)
        # The representation reproduces the image tokens: alpha * (K G) + Z U.
        rebuilt = terms.alpha.unsqueeze(-1) * (fast.cache.keys * terms.gamma) + terms.z @ terms.u
        assert (rebuilt - keys).abs().max().item() <= 1e-4 * keys.abs().max().item()
        mask_tokens = mask_tokens_of(fast, queries, tokens, keys)
        want = fast.masks(mask_tokens, keys, [1, 2, 3])
        got = fast.masks(mask_tokens, keys, [1, 2, 3], low_rank=low_rank)
        want_some = fast.masks(mask_tokens[pick], keys[pick], [0, 2])
        got_some_formed = fast.masks(mask_tokens[pick], keys[pick], [0, 2], low_rank=low_rank.select(pick))
        assert fast.transformer(sparse, conv(hidden), low_rank=True)[3] is None
    graded = FastDecoder(dec, pe, no_mask, mask_projection=conv)
    assert graded.transformer(sparse.clone(), embedding=emb, low_rank=True, **mask)[3] is None
    tol = 1e-5 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= tol
    assert (got_some - want_some).abs().max().item() <= tol  # selected before the terms were formed
    assert (got_some_formed - want_some).abs().max().item() <= tol  # and after they were formed for all


def test_mask_features_and_projection_make_the_mask_embedding():
    """The fast paths feed a mask prompt as ``mask_features`` and fold ``mask_projection`` into the
    per-image cache; together they are the prompt encoder's mask embedding."""
    pe = anyseg.load_model("nano").prompt_encoder
    masks = torch.randn(2, 1, *pe.mask_input_size)
    with torch.inference_mode():
        hidden = pe.mask_features(masks)
        assert hidden.shape[1] == pe.mask_projection.in_channels
        assert torch.allclose(pe.mask_projection(hidden), pe.embed_masks(masks), atol=1e-6)


def test_fast_decoder_without_projections_needs_a_mask_prompt():
    """``set_image(project=False)`` (the single-call form of ONNX export) skips the per-image
    projections: decoding with a dense prompt matches, decoding without one is refused."""
    torch.manual_seed(1)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    emb, pe, no_mask = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8), torch.randn(1, 256)
    sparse = torch.randn(2, 3, 256)
    dense = no_mask.view(1, -1, 1, 1).expand(2, -1, 8, 8)
    with torch.inference_mode():
        want_masks, want_iou = dec(emb, pe, sparse, dense, True)
        fast = FastDecoder(dec, pe, no_mask)
        cache = fast.set_image(emb, project=False)
        assert cache.kh0 is None and cache.q0 is None
        got_masks, got_iou = fast(sparse, dense, True)
        with pytest.raises(ValueError, match="project=True"):
            fast(sparse, None, True)
    assert (got_masks - want_masks).abs().max().item() <= 1e-4 * max(1.0, want_masks.abs().max().item())
    assert (got_iou - want_iou).abs().max().item() <= 1e-4


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_reuses_large_blocks():
    """After ``keep_freed_memory()`` a freed 16 MB tensor's memory is reused by the next one instead of
    being unmapped and faulted in again page by page (4096 page faults per tensor without it)."""
    import resource

    from anyseg.speed import keep_freed_memory

    assert keep_freed_memory() is True
    for _ in range(10):  # until the heap has settled around the earlier allocations of the process
        x = torch.ones(1 << 22)
        del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.ones(1 << 22)
        del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Without it every block is faulted in afresh (10 x 4096 pages); with it at most the heap's growth.
    assert faults < 2 * 4096, f"{faults} page faults for 10 reused 16 MB blocks"
    assert SpeedConfig.lossless().keep_freed_memory and not SpeedConfig.faithful().keep_freed_memory


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_keeps_a_decoder_batch_working_set():
    """A working set like one segment-everything batch on a CPU (six 64 MiB temporaries alive at once,
    then all freed) stays in the heap after ``keep_freed_memory()``: the next batch reuses it instead of
    glibc trimming the heap and every page being faulted in again (about 98000 faults per batch with
    a 256 MiB trim threshold). Checked with the C allocator directly, in a fresh process, so that no other
    allocation sits above the freed blocks."""
    import subprocess
    import sys

    script = """
import ctypes, resource
from anyseg.speed import keep_freed_memory
assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def batch(size=64 << 20):
    blocks = [libc.malloc(size) for _ in range(6)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    assert faults < 4096, f"{faults} page faults for 3 reused batches of 6 x 64 MiB"


@pytest.mark.parametrize("input_size,original", [((683, 1024), (534, 800)), ((1024, 683), (1800, 1200)),
                                                  ((1024, 1024), (100, 100)), ((1024, 5), (4000, 20))])
def test_mask_resizer_matches_two_bilinear_resizes(input_size, original):
    torch.manual_seed(0)
    low = F.avg_pool2d(torch.randn(2, 1, 260, 260) * 20, 5, stride=1)[:, 0, :256, :256]  # smooth logits
    want = F.interpolate(low[:, None], (1024, 1024), mode="bilinear", align_corners=False)
    want = F.interpolate(want[..., : input_size[0], : input_size[1]], original, mode="bilinear",
                         align_corners=False)[:, 0]
    resizer = MaskResizer(256, 1024, input_size, original)
    got = resizer(low)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-3
    masks = resizer(low, 0.5)  # thresholded inside: the same booleans as thresholding the logits
    assert masks.dtype == torch.bool and torch.equal(masks, got > 0.5) and 0 < masks.sum() < masks.numel()
    with pytest.raises(ValueError, match="logits"):
        MaskResizer(256, 1024, input_size, original)(torch.zeros(1, 64, 64))


def test_rle_on_device_matches_reference_rle():
    torch.manual_seed(0)
    masks = torch.rand(5, 7, 9) > 0.5
    masks[0] = True
    masks[1] = False
    for a, b in zip(rle_counts_on_device(masks), rle_counts(masks)):
        np.testing.assert_array_equal(a, b)


def test_match_records_counts_both_directions():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[2:] = True
    recs_a = [{"segmentation": a}, {"segmentation": b}]
    recs_b = [{"segmentation": a}]
    out = match_records(recs_a, recs_b)
    assert out["a_in_b"] == 0.5 and out["b_in_a"] == 1.0


# ---------------------------------------------------------------------------------- golden parity
@pytest.fixture(scope="module", params=["mobilesam", "vit_small"])
def golden_model(request, manifest, golden_dir):
    entry = manifest[request.param]
    return request.param, entry, anyseg.load_model(golden_dir / entry["checkpoint"])


def test_lossless_predictor_keeps_golden_tolerances(golden_model, golden_dir, images_dir):
    name, entry, model = golden_model
    apply(model, SpeedConfig.lossless())
    try:
        predictor = anyseg.SamPredictor(model)
        predictor.set_image(images_dir / "dog.jpg")
        spec = next(p for p in entry["predictor"] if p["image"] == "dog.jpg")
        golden = np.load(golden_dir / spec["file"])
        err = (predictor.get_image_embedding() - torch.from_numpy(golden["image_embedding"])).abs().max().item()
        assert err <= 1e-3
        checked = 0
        for case in spec["cases"]:
            if case["name"] in ("batched_boxes", "logits_case"):
                continue
            masks, iou, low_res = predictor.predict(**golden_prompt_kwargs(case, golden))
            check_golden_outputs(case["name"], golden, masks, iou, low_res)
            checked += 1
        assert checked == 6
    finally:
        apply(model, SpeedConfig.faithful())


def test_lossless_amg_keeps_golden_tolerances(manifest, golden_dir, images_dir):
    import json

    from anyseg.masks import coco_rle_to_mask

    entry = manifest["mobilesam"]
    model = anyseg.load_model(golden_dir / entry["checkpoint"])
    case = entry["amg"][0]
    want = json.loads((golden_dir / case["file"]).read_text())["masks"]
    # Odd batch size and on-device masks: neither may change the records.
    apply(model, SpeedConfig.lossless(amg_points_per_batch=7, amg_device_masks=True))
    try:
        got = anyseg.MaskGenerator(model, output_mode="coco_rle", **case["params"]).generate(images_dir / "groceries.jpg")
    finally:
        apply(model, SpeedConfig.faithful())
    assert len(got) == len(want) == case["n_masks"]
    for g, w in zip(got, want):
        assert abs(g["predicted_iou"] - w["predicted_iou"]) <= 1e-3
        assert abs(g["stability_score"] - w["stability_score"]) <= 1e-3
        assert np.abs(np.array(g["bbox"]) - np.array(w["bbox"])).max() <= 2
        assert g["point_coords"] == w["point_coords"] and g["crop_box"] == w["crop_box"]
        assert mask_iou(coco_rle_to_mask(g["segmentation"]), coco_rle_to_mask(w["segmentation"])) >= 0.99


def test_int8_encoder_quality_bar_vit_small(manifest, golden_dir, images_dir):
    """Dynamic int8 encoder on the ViT checkpoint: every golden case keeps mask IoU >= 0.98."""
    from anyseg.fast.quality import predictor_quality

    entry = manifest["vit_small"]
    model = anyseg.load_model(golden_dir / entry["checkpoint"])
    image = anyseg.load_image(images_dir / "dog.jpg")
    out = predictor_quality(model, SpeedConfig.lossless(int8_encoder=True), [image], [predictor_cases(entry, "dog.jpg")])
    assert out["min_iou"] >= 0.98, out["per_case"]
    assert get_config(model) is None


def test_bf16_encoder_keeps_mobilesam_last_stage_and_neck_in_float32(manifest, golden_dir, images_dir):
    """A bfloat16 MobileSAM encoder runs in a copy whose last TinyViT stage and neck stay float32 (the
    default of ``SENSITIVE_MODULES``); the model's own modules and state dict are untouched, and the
    golden cases keep mask IoU >= 0.98 (all-bfloat16 gives 0.93 on the worst case)."""
    from anyseg.fast.quality import predictor_quality
    from anyseg.speed import _Float32, float32_modules

    entry = manifest["mobilesam"]
    model = anyseg.load_model(golden_dir / entry["checkpoint"])
    keys = list(model.state_dict())
    config = SpeedConfig.lossless(encoder_dtype=torch.bfloat16)
    assert float32_modules(model, config) == ("layers.3", "neck")
    assert float32_modules(model, SpeedConfig.lossless(encoder_dtype=torch.float16)) == ()
    assert float32_modules(model, replace(config, encoder_float32=())) == ()
    apply(model, config)
    encoder = model.speed_runtime.encoder
    assert encoder is not model.image_encoder
    assert isinstance(encoder.layers[3], _Float32) and isinstance(encoder.neck, _Float32)
    assert not any(isinstance(m, _Float32) for m in model.modules()) and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="no submodule"):
        apply(model, replace(config, encoder_float32=("layers.9",)))
    image = anyseg.load_image(images_dir / "truck.jpg")
    out = predictor_quality(model, config, [image], [predictor_cases(entry, "truck.jpg")])
    assert out["min_iou"] >= 0.98, out["per_case"]


# ------------------------------------------------------------------------------------------- GPU
@CUDA
def test_gpu_auto_matches_cpu_faithful(manifest, golden_dir, images_dir):
    from anyseg.fast.quality import mask_iou as iou

    entry = manifest["vit_small"]
    image = anyseg.load_image(images_dir / "dog.jpg")
    cpu = anyseg.SamPredictor(anyseg.load_model(golden_dir / entry["checkpoint"]))
    gpu_model = apply(anyseg.load_model(golden_dir / entry["checkpoint"], device="cuda"), SpeedConfig.auto("cuda"))
    gpu = anyseg.SamPredictor(gpu_model)
    cpu.set_image(image)
    gpu.set_image(image)
    for case in predictor_cases(entry, "dog.jpg"):
        want, _, _ = cpu.predict(**case["kwargs"])
        got, _, _ = gpu.predict(**case["kwargs"])
        assert min(iou(a, b) for a, b in zip(got, want)) >= 0.98, case["name"]


@CUDA
def test_gpu_lossless_amg_matches_faithful(manifest, golden_dir, images_dir):
    from anyseg.fast.quality import amg_quality

    entry = manifest["mobilesam"]
    model = anyseg.load_model(golden_dir / entry["checkpoint"], device="cuda")
    out = amg_quality(model, SpeedConfig.auto("cuda"), anyseg.load_image(images_dir / "groceries.jpg"),
                      entry["amg"][0]["params"])
    assert out["fast_in_faithful"] >= 0.95 and out["faithful_in_fast"] >= 0.95


def test_load_model_speed_presets(golden_dir, manifest):
    path = golden_dir / manifest["mobilesam"]["checkpoint"]
    faithful = anyseg.load_model(path)
    assert get_config(faithful) in (None, SpeedConfig.faithful())
    fast = anyseg.load_model(path, speed="lossless")
    assert get_config(fast) == SpeedConfig.lossless()
    for a, b in zip(faithful.state_dict().values(), fast.state_dict().values()):
        assert torch.equal(a, b), "fast paths never change the weights"
    with pytest.raises(ValueError, match="faithful, lossless, auto"):
        anyseg.load_model(path, speed="turbo")


def test_ieee_float32_turns_tf32_off_on_cuda_only_and_restores():
    from anyseg.speed import ieee_float32

    conv = torch.backends.cudnn.conv.fp32_precision
    matmul = torch.backends.cuda.matmul.fp32_precision
    with ieee_float32("cpu"):
        assert torch.backends.cudnn.conv.fp32_precision == conv
    with ieee_float32("cuda"):  # only backend flags: runs without a GPU too
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == conv
    assert torch.backends.cuda.matmul.fp32_precision == matmul
    with pytest.raises(RuntimeError, match="inside"):
        with ieee_float32("cuda"):
            raise RuntimeError("inside")
    assert torch.backends.cudnn.conv.fp32_precision == conv


def test_encoder_cast_runs_a_reduced_precision_copy(manifest, golden_dir, images_dir):
    from anyseg.fast.quality import predictor_quality

    with pytest.raises(ValueError, match="encoder_cast needs encoder_dtype"):
        SpeedConfig(encoder_cast=True)
    entry = manifest["vit_small"]
    model = anyseg.load_model(golden_dir / entry["checkpoint"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SpeedConfig.lossless(encoder_dtype=torch.bfloat16, encoder_cast=True)
    apply(model, config)
    runtime_dtypes = {p.dtype for p in model.speed_runtime.encoder.parameters()}
    assert runtime_dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the model itself stays float32"
    image = anyseg.load_image(images_dir / "dog.jpg")
    cases = predictor_cases(entry, "dog.jpg")[:3]
    q = predictor_quality(model, config, [image], [cases])
    assert q["min_iou"] >= 0.98, q
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
