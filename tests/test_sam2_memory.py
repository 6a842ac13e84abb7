"""SAM 2 memory encoder and memory attention: shapes, RoPE properties, public keys, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from anyseg.config_sam2 import MemoryAttentionConfig, MemoryEncoderConfig
from anyseg.modeling.sam2.memory_attention import (MemoryAttention, RoPEAttention, apply_rope,
                                                   axial_rope_tables)
from anyseg.modeling.sam2.memory_encoder import MemoryEncoder
from anyseg.modeling.sam2.position import sine_position_encoding_2d

TINY_ATTN = MemoryAttentionConfig(d_model=32, num_layers=2, dim_feedforward=48, num_heads=2, kv_in_dim=16,
                                  feat_sizes=(4, 6))
TINY_ENC = MemoryEncoderConfig(out_dim=16, in_dim=32, fuser_num_layers=2, mask_downsample_stride=4)


def _assert_all_grads(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reached {missing}"


def _golden_sub_state_dict(golden_dir, prefix: str) -> dict:
    ckpt = golden_dir / "sam2" / "sam2.1_golden.pt"
    sd = torch.load(ckpt, weights_only=True, map_location="cpu")["model"]
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    assert sub, f"no {prefix}* keys in the golden checkpoint"
    return sub


# --- RoPE --------------------------------------------------------------------------------------------

def _rope_by_spec(x: torch.Tensor, h: int, w: int, theta: float = 10000.0) -> torch.Tensor:
    """Spec 7 written out with complex numbers: pair m < D/4 turns by column * f_m, the others by
    row * f_(m - D/4), f_j = theta^(-4j/D)."""
    n, d = x.shape[-2:]
    quarter = d // 4
    f = theta ** (-4.0 * torch.arange(quarter, dtype=torch.float64) / d)
    idx = torch.arange(n, dtype=torch.float64)
    col, row = idx % w, torch.floor(idx / w)
    angle = torch.cat([col[:, None] * f, row[:, None] * f], dim=1)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def test_rope_matches_spec_formula_and_position_zero_is_identity():
    h, w, d = 3, 5, 16
    x = torch.randn(2, h * w, d)
    cos, sin = axial_rope_tables(h, w, d)
    assert cos.shape == sin.shape == (h * w, d // 2) and cos.dtype == torch.float32
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.double(), _rope_by_spec(x, h, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated[:, 0], x[:, 0])
    # Token 1 is column 1 row 0: only the column half of the pairs turns.
    assert torch.equal(rotated[:, 1, d // 2:], x[:, 1, d // 2:])
    assert not torch.allclose(rotated[:, 1, : d // 2], x[:, 1, : d // 2])


def test_rope_preserves_norms():
    x = torch.randn(3, 64 * 64, 256) * 5
    cos, sin = axial_rope_tables(64, 64, 256)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-4)


def test_rope_dot_product_depends_only_on_position_difference():
    h, w, d = 8, 8, 32
    cos, sin = axial_rope_tables(h, w, d)
    q, k = torch.randn(d, dtype=torch.float32), torch.randn(d, dtype=torch.float32)

    def score(pq, pk):
        nq, nk = pq[1] * w + pq[0], pk[1] * w + pk[0]
        rq = apply_rope(q[None], cos[nq:nq + 1], sin[nq:nq + 1])[0]
        rk = apply_rope(k[None], cos[nk:nk + 1], sin[nk:nk + 1])[0]
        return float(rq @ rk)

    base = score((1, 2), (4, 3))                     # difference (+3, +1)
    for shift in [(2, 0), (0, 3), (3, 4), (-1, -2)]:
        pq = (1 + shift[0], 2 + shift[1])
        pk = (4 + shift[0], 3 + shift[1])
        assert math.isclose(score(pq, pk), base, rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score((1, 2), (5, 3)), base, rel_tol=1e-3)   # another difference, another score


def test_rope_rejects_head_dim_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        axial_rope_tables(4, 4, 18)


def test_cross_attention_repeats_rope_per_memory_frame_and_skips_pointer_tokens():
    torch.manual_seed(0)
    h, w, d, kv, heads = 2, 3, 16, 8, 2
    attn = RoPEAttention(d, heads, kv_in_dim=kv, feat_sizes=(h, w), rope_k_repeat=True)
    nq, frames, ptrs = h * w, 2, 3
    q_in = torch.randn(1, nq, d)
    mem = torch.randn(1, frames * nq + ptrs, kv)
    out = attn(q_in, mem, mem, num_k_exclude_rope=ptrs)

    # Independent computation from the spec, per head with complex rotations.
    hd = d // heads
    q = attn.q_proj(q_in).reshape(1, nq, heads, hd).transpose(1, 2)
    k = attn.k_proj(mem).reshape(1, -1, heads, hd).transpose(1, 2)
    v = attn.v_proj(mem).reshape(1, -1, heads, hd).transpose(1, 2)
    q = _rope_by_spec(q, h, w).float()
    k_frames = [_rope_by_spec(k[..., i * nq:(i + 1) * nq, :], h, w).float() for i in range(frames)]
    k = torch.cat(k_frames + [k[..., frames * nq:, :]], dim=-2)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    expected = attn.out_proj((probs @ v).transpose(1, 2).reshape(1, nq, d))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # A key count that is not a whole number of grids is refused, as is excluding too many.
    with pytest.raises(ValueError, match="rotated keys"):
        attn(q_in, mem, mem, num_k_exclude_rope=ptrs - 1)
    with pytest.raises(ValueError, match="exceeds"):
        attn(q_in, mem, mem, num_k_exclude_rope=mem.shape[1] + 1)


def test_self_attention_without_k_repeat_needs_equal_lengths():
    attn = RoPEAttention(16, 1, feat_sizes=(2, 2))
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="rotated keys"):
        attn(x, torch.randn(1, 8, 16), torch.randn(1, 8, 16))


def test_query_grid_falls_back_to_square_and_refuses_other_lengths():
    attn = RoPEAttention(16, 1, feat_sizes=(64, 64))
    assert attn.grid_for(64 * 64) == (64, 64)
    assert attn.grid_for(32 * 32) == (32, 32)
    with pytest.raises(ValueError, match="square"):
        attn.grid_for(30)


# --- memory attention ------------------------------------------------------------------------------

def _tiny_inputs(batch=2, frames=2, ptrs=8, cfg=TINY_ATTN, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.feat_sizes[0] * cfg.feat_sizes[1]
    curr = torch.randn(batch, n, cfg.d_model, generator=g)
    curr_pos = torch.randn(batch, n, cfg.d_model, generator=g)
    memory = torch.randn(batch, frames * n + ptrs, cfg.kv_in_dim, generator=g)
    memory_pos = torch.randn(batch, frames * n + ptrs, cfg.kv_in_dim, generator=g)
    return curr, curr_pos, memory, memory_pos


def test_memory_attention_shapes_no_nan_and_gradients():
    torch.manual_seed(0)
    model = MemoryAttention(TINY_ATTN)
    assert len(model.layers) == 2
    curr, curr_pos, memory, memory_pos = _tiny_inputs()
    out = model(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=8)
    assert out.shape == curr.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads(model)


def test_memory_attention_batch_items_are_independent_and_input_pos_is_scaled():
    torch.manual_seed(1)
    model = MemoryAttention(TINY_ATTN).eval()
    curr, curr_pos, memory, memory_pos = _tiny_inputs(batch=2)
    both = model(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=8)
    one = model(curr[1:], curr_pos[1:], memory[1:], memory_pos[1:], num_obj_ptr_tokens=8)
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)
    # The input position is added with weight 0.1.
    shifted = model(curr + 0.1 * curr_pos, None, memory, memory_pos, num_obj_ptr_tokens=8)
    torch.testing.assert_close(shifted, both, atol=1e-5, rtol=1e-5)


def test_memory_attention_pointer_tokens_are_not_rotated():
    torch.manual_seed(2)
    model = MemoryAttention(TINY_ATTN).eval()
    curr, curr_pos, memory, memory_pos = _tiny_inputs(batch=1, frames=1, ptrs=0)
    n = curr.shape[1]
    # The same 24 tokens given as one spatial memory or as unrotated "pointer" tokens give different
    # outputs: the count decides which keys turn.
    a = model(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=0)
    b = model(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=n)
    assert not torch.allclose(a, b, atol=1e-4)
    # Pointer tokens carry no position: permuting them (with their positions) changes nothing.
    _, _, ptr, ptr_pos = _tiny_inputs(batch=1, frames=0, ptrs=6, seed=3)
    mem = torch.cat([memory, ptr], 1)
    pos = torch.cat([memory_pos, ptr_pos], 1)
    perm = torch.randperm(6)
    mem_p = torch.cat([memory, ptr[:, perm]], 1)
    pos_p = torch.cat([memory_pos, ptr_pos[:, perm]], 1)
    torch.testing.assert_close(model(curr, curr_pos, mem, pos, num_obj_ptr_tokens=6),
                               model(curr, curr_pos, mem_p, pos_p, num_obj_ptr_tokens=6), atol=1e-5, rtol=1e-5)


def test_memory_attention_sdpa_fast_path_matches_plain():
    torch.manual_seed(3)
    model = MemoryAttention(TINY_ATTN).eval()
    args = _tiny_inputs()
    assert model.use_sdpa is False
    plain = model(*args, num_obj_ptr_tokens=8)
    model.use_sdpa = True
    assert all(l.self_attn.use_sdpa and l.cross_attn_image.use_sdpa for l in model.layers)
    fast = model(*args, num_obj_ptr_tokens=8)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


def test_memory_attention_has_no_buffers():
    model = MemoryAttention(MemoryAttentionConfig())
    assert list(model.buffers()) == []
    assert all(k.startswith(("layers.", "norm.")) for k in model.state_dict())


# --- memory encoder --------------------------------------------------------------------------------

def test_memory_encoder_shapes_position_and_gradients():
    torch.manual_seed(0)
    enc = MemoryEncoder(TINY_ENC)
    # stride 4 -> two downsampling convs (1 -> 4 -> 16) then a 1x1 conv to in_dim
    convs = [m for m in enc.mask_downsampler.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 16), (16, 32)]
    pix = torch.randn(2, 32, 5, 7)
    masks = torch.randn(2, 1, 20, 28) * 10
    feats, pos = enc(pix, masks)
    assert feats.shape == (2, 16, 5, 7) and pos.shape == (2, 16, 5, 7)
    assert torch.isfinite(feats).all()
    expected_pos = sine_position_encoding_2d(5, 7, 16)
    torch.testing.assert_close(pos[0], expected_pos)
    torch.testing.assert_close(pos[1], expected_pos)
    (feats * torch.randn_like(feats)).sum().backward()
    _assert_all_grads(enc)


def test_memory_encoder_sigmoid_flag_and_size_check():
    torch.manual_seed(1)
    enc = MemoryEncoder(TINY_ENC).eval()
    pix = torch.randn(1, 32, 4, 4)
    logits = torch.randn(1, 1, 16, 16) * 4
    a, _ = enc(pix, logits, skip_mask_sigmoid=False)
    b, _ = enc(pix, torch.sigmoid(logits), skip_mask_sigmoid=True)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="downsamples"):
        enc(pix, torch.randn(1, 1, 32, 32))


def test_memory_encoder_default_downsampler_layout():
    enc = MemoryEncoder(MemoryEncoderConfig())
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items() if k.startswith("mask_downsampler")}
    convs = [shapes[f"mask_downsampler.encoder.{i}.weight"] for i in (0, 3, 6, 9, 12)]
    assert convs == [(4, 1, 3, 3), (16, 4, 3, 3), (64, 16, 3, 3), (256, 64, 3, 3), (256, 256, 1, 1)]
    assert list(enc.buffers()) == []


# --- golden checkpoint keys ------------------------------------------------------------------------

GOLDEN_ATTN = MemoryAttentionConfig(num_layers=2, dim_feedforward=512)
GOLDEN_ENC = MemoryEncoderConfig(fuser_num_layers=1)


def test_golden_memory_encoder_keys_load_strictly_and_run(golden_dir):
    sub = _golden_sub_state_dict(golden_dir, "memory_encoder.")
    enc = MemoryEncoder(GOLDEN_ENC).eval()
    assert sorted(enc.state_dict()) == sorted(sub)
    enc.load_state_dict(sub, strict=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        mask = (torch.rand(1, 1, 1024, 1024) > 0.5).float() * 20 - 10
        feats, pos = enc(torch.randn(1, 256, 64, 64), mask)
    assert feats.shape == pos.shape == (1, 64, 64, 64)
    assert torch.isfinite(feats).all()


def test_golden_memory_attention_keys_load_strictly_and_run(golden_dir):
    sub = _golden_sub_state_dict(golden_dir, "memory_attention.")
    model = MemoryAttention(GOLDEN_ATTN).eval()
    assert sorted(model.state_dict()) == sorted(sub)
    model.load_state_dict(sub, strict=True)
    torch.manual_seed(0)
    curr = torch.randn(1, 4096, 256)
    curr_pos = sine_position_encoding_2d(64, 64, 256).flatten(1).T[None]
    memory = torch.randn(1, 4096 + 8, 64)
    memory_pos = torch.randn(1, 4096 + 8, 64)
    with torch.inference_mode():
        out = model(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=8)
    assert out.shape == (1, 4096, 256)
    assert torch.isfinite(out).all()
