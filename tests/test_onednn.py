"""anyseg.fast.onednn (oneDNN products) and the pixel shuffle of the fast decoder."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from anyseg.config import MaskDecoderConfig
from anyseg.fast import onednn
from anyseg.fast.decoder import FastDecoder, _pixel_shuffle
from anyseg.modeling.mask_decoder import MaskDecoder

needs_onednn = pytest.mark.skipif(not onednn._PRESENT, reason="this PyTorch build has no oneDNN linear ops")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


@needs_onednn
@pytest.mark.parametrize("activation,reference", [("none", lambda x: x), ("relu", F.relu), ("gelu", F.gelu)])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_linear_matches_torch_plain_and_packed(activation, reference, rows):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, rows, 64), torch.randn(96, 64), torch.randn(96)
    want = reference(F.linear(x, w, b))
    assert onednn.usable(x, w, b)
    assert _close(onednn.linear(x, w, b, activation), want)
    packed = onednn.pack(w, 7)  # packed for another row count: still correct
    assert _close(onednn.linear(x, w, b, activation, packed=packed), want)
    assert _close(onednn.linear(x, w, None, activation, packed=packed), reference(F.linear(x, w)))


@needs_onednn
def test_linear_falls_back_under_autograd_autocast_and_other_dtypes():
    torch.manual_seed(0)
    x, w = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True)
    assert not onednn.usable(x, w)
    y = onednn.linear(x, w, None, "relu")
    y.sum().backward()  # the fallback is differentiable
    assert w.grad is not None and _close(w.grad, (F.linear(x, w) > 0).float().t() @ x)
    with torch.no_grad():
        assert onednn.usable(x, w)
    assert not onednn.usable(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.usable(x)
    try:
        onednn.ENABLED = False
        assert not onednn.usable(x)
    finally:
        onednn.ENABLED = True


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("add", [None, "full", "rows", "shared rows"])
def test_bmm_nt_matches_baddbmm(batch, add):
    torch.manual_seed(0)
    a, b = torch.randn(batch, 12, 32), torch.randn(batch, 50, 32)
    extra = {None: None, "full": torch.randn(batch, 12, 50), "rows": torch.randn(batch, 12, 1),
             "shared rows": torch.randn(1, 12, 1)}[add]
    want = torch.bmm(a, b.transpose(1, 2)) if extra is None else torch.baddbmm(extra, a, b.transpose(1, 2))
    assert _close(onednn.bmm_nt(a, b, extra), want)
    # b given as a transposed view (as the decoder passes the image tokens)
    bt = torch.randn(batch, 32, 50)
    assert _close(onednn.bmm_nt(a, bt.transpose(1, 2)), torch.bmm(a, bt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("into", [False, True])
def test_pixel_shuffle_places_each_upscaled_pixel(dtype, into):
    """Element (i, j, a, b, a2, b2) of each mask lands on row 4i + 2a + a2, column 4j + 2b + b2, bit for
    bit, whether pairs move as one wider element (float32, bfloat16) or not (float64)."""
    n, k, h, w = 2, 3, 5, 4
    m = torch.randn(n, k, h * w * 16).to(dtype)
    out = torch.empty(n, k, 4 * h, 4 * w, dtype=dtype) if into else None
    got = _pixel_shuffle(m, h, w, out=out)
    if into:
        assert got is out
    src = m.view(n, k, h, w, 2, 2, 2, 2)
    want = torch.empty(n, k, 4 * h, 4 * w, dtype=dtype)
    for i in range(h):
        for j in range(w):
            for a in range(2):
                for b in range(2):
                    for a2 in range(2):
                        for b2 in range(2):
                            want[:, :, 4 * i + 2 * a + a2, 4 * j + 2 * b + b2] = src[:, :, i, j, a, b, a2, b2]
    assert torch.equal(got, want)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_decoder_with_and_without_onednn_matches_mask_decoder(enabled, batch, monkeypatch):
    monkeypatch.setattr(onednn, "ENABLED", enabled)
    torch.manual_seed(0)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    for p in dec.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    emb, pe, no_mask = torch.randn(1, 256, 16, 16), torch.randn(1, 256, 16, 16), torch.randn(1, 256)
    sparse = torch.randn(batch, 3, 256)
    dense = no_mask.view(1, -1, 1, 1).expand(batch, -1, 16, 16)
    with torch.inference_mode():
        want_masks, want_iou = dec(emb, pe, sparse, dense, True)
        fast = FastDecoder(dec, pe, no_mask)
        got_masks, got_iou = fast(sparse, None, True, embedding=emb)
        copied = copy.deepcopy(fast)(sparse, None, True)  # after packing: a copy packs again
    assert _close(got_masks, want_masks, 1e-4) and (got_iou - want_iou).abs().max().item() <= 1e-4
    assert _close(copied[0], got_masks, 1e-6)


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_packed_linear_matches_linear_and_follows_weight_updates(activation):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    packed = onednn.PackedLinear(lin, activation)
    x = torch.randn(5, 32)
    act = F.gelu if activation == "gelu" else (lambda t: t)
    with torch.no_grad():
        assert _close(packed(x), act(lin(x)))
        lin.weight.mul_(-2.0)  # in place: the packed copy must be made again
        assert _close(packed(x), act(lin(x)))
    y = packed(x)  # with autograd: the plain op, differentiable
    y.sum().backward()
    assert lin.weight.grad is not None
    with pytest.raises(ValueError, match="activation"):
        onednn.PackedLinear(lin, "tanh")


def _tiny_models():
    from anyseg.config import SamConfig, TinyViTConfig, ViTConfig
    from anyseg.modeling.sam import build_sam

    torch.manual_seed(0)
    tiny_vit = build_sam(SamConfig(encoder=TinyViTConfig(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                                                         num_heads=(1, 1, 1, 2), img_size=256)))
    vit = build_sam(SamConfig(encoder=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                                                img_size=256)))
    return {"tiny_vit": tiny_vit.eval(), "vit": vit.eval()}


@needs_onednn
@pytest.mark.parametrize("kind", ["tiny_vit", "vit"])
def test_onednn_encoder_shares_parameters_and_encodes_like_the_faithful_encoder(kind, monkeypatch):
    from anyseg import speed
    from anyseg.speed import SpeedConfig, apply, encode

    model = _tiny_models()[kind]
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        want = encode(model, x)
        apply(model, SpeedConfig.lossless())
        twin = model.speed_runtime.encoder
        assert twin is not model.image_encoder
        packed = [m for m in twin.modules() if isinstance(m, onednn.PackedLinear)]
        plain = [m for m in model.image_encoder.modules() if type(m) is torch.nn.Linear]
        assert len(packed) == len(plain) and any(m.activation == "gelu" for m in packed)
        assert {p.data_ptr() for p in twin.parameters()} == {p.data_ptr() for p in model.image_encoder.parameters()}
        assert _close(encode(model, x), want, 1e-4)
        # None packs only up to ONEDNN_ENCODER_MAX_BYTES; True always; False never
        monkeypatch.setattr(speed, "ONEDNN_ENCODER_MAX_BYTES", 0)
        apply(model, SpeedConfig.lossless())
        assert model.speed_runtime.encoder is model.image_encoder
        apply(model, SpeedConfig.lossless(onednn_encoder=True))
        assert model.speed_runtime.encoder is not model.image_encoder
        apply(model, SpeedConfig.lossless(onednn_encoder=False))
        assert model.speed_runtime.encoder is model.image_encoder
        assert _close(encode(model, x), want, 1e-4)


def test_activation_name_only_for_what_onednn_fuses_exactly():
    assert onednn.activation_name(torch.nn.ReLU()) == "relu"
    assert onednn.activation_name(torch.nn.GELU()) == "gelu"
    assert onednn.activation_name(torch.nn.GELU(approximate="tanh")) is None
    assert onednn.activation_name(torch.nn.SiLU()) is None


@needs_onednn
def test_model_with_a_packed_encoder_can_be_copied_and_saved():
    """The server and ONNX export deep-copy the model; packed oneDNN weights cannot be copied, so a
    copy packs again on first use and encodes the same."""
    import io

    from anyseg.speed import SpeedConfig, apply, encode

    model = _tiny_models()["tiny_vit"]
    apply(model, SpeedConfig.lossless())
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        want = encode(model, x)  # packs the weights
        twin = copy.deepcopy(model)
        assert _close(encode(twin, x), want)
        assert _close(encode(model, x), want)
    torch.save(model, io.BytesIO())
