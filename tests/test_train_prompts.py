"""Properties of the interactive prompt simulation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anyseg.config import MaskDecoderConfig, PromptEncoderConfig, SamConfig, ViTConfig
from anyseg.modeling.sam import build_sam
from anyseg.train.interactive import decode_tokens
from anyseg.train.prompts import (BOX_BR, BOX_TL, FOREGROUND, PAD, PromptState, cells_to_model, error_points,
                                  iteration_schedule, jittered_boxes, mask_boxes_torch, uniform_cell)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_masks(b: int, size: int, seed: int) -> torch.Tensor:
    """Blobs: random rectangles unioned with random ellipses."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((b, size, size), bool)
    for i in range(b):
        cy, cx, ry, rx = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, *rng.uniform(3, size / 4, 2)
        out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return torch.from_numpy(out)


def test_iteration_schedule_has_8_point_and_2_refinement_iterations():
    positions = set()
    for seed in range(60):
        schedule = iteration_schedule(_gen(seed))
        assert len(schedule) == 10 and sum(schedule) == 8
        assert schedule[-1] is False
        positions.add(schedule[:-1].index(False))
    assert positions == set(range(9))  # the inner refinement lands anywhere among the 8 point iterations
    assert iteration_schedule(_gen(), 3, 0) == [True] * 3


def test_uniform_cell_stays_in_region_and_is_uniform():
    region = torch.zeros(1, 6, 6, dtype=torch.bool)
    cells = [(1, 1), (1, 4), (5, 0), (3, 3)]
    for r, c in cells:
        region[0, r, c] = True
    counts = {cell: 0 for cell in cells}
    gen = _gen(1)
    for _ in range(2000):
        rc, found = uniform_cell(region, gen)
        assert bool(found[0])
        counts[tuple(rc[0].tolist())] += 1
    assert sum(counts.values()) == 2000
    assert all(400 < v < 600 for v in counts.values()), counts
    rc, found = uniform_cell(torch.zeros(2, 4, 4, dtype=torch.bool), gen)
    assert not found.any()


@pytest.mark.parametrize("grid,img_size", [(64, 64), (32, 128)])
def test_error_points_lie_in_error_regions_with_right_labels(grid, img_size):
    gt = _random_masks(64, grid, seed=1)
    pred = _random_masks(64, grid, seed=2)
    valid = torch.zeros_like(gt)
    valid[:, :, : grid - 5] = True
    pred[0] = gt[0]  # perfect prediction: no point
    gen = _gen(3)
    for _ in range(5):
        xy, labels, found = error_points(pred, gt, valid, img_size, gen)
        assert not bool(found[0])
        scale = img_size / grid
        cols = torch.round((xy[:, 0] + 0.5) / scale - 0.5).long()
        rows = torch.round((xy[:, 1] + 0.5) / scale - 0.5).long()
        back = cells_to_model(torch.stack([rows, cols], 1), grid, img_size)
        assert torch.allclose(back, xy)
        for i in torch.nonzero(found).squeeze(1).tolist():
            r, c = int(rows[i]), int(cols[i])
            assert valid[i, r, c]
            fn = bool(gt[i, r, c] and not pred[i, r, c])
            fp = bool(pred[i, r, c] and not gt[i, r, c])
            assert fn or fp
            assert int(labels[i]) == (1 if fn else 0)


def test_jittered_boxes_are_bounded_ordered_and_noisy():
    size = 256
    gt = _random_masks(400, size, seed=5)
    input_size = torch.tensor([[size, size]] * len(gt))
    box, exact = jittered_boxes(gt, input_size, img_size=size, generator=_gen(4), noise_frac=0.1, max_noise=6.0)
    cells = mask_boxes_torch(gt).float()
    assert torch.equal(exact, cells)  # work grid = model frame here
    assert (box[:, 0] <= box[:, 2]).all() and (box[:, 1] <= box[:, 3]).all()
    assert (box >= 0).all() and (box <= size - 1).all()
    assert ((box - exact).abs() <= 6.0 + 1e-4).all()
    # noise scales with the box side: std 10% of the side where the clamp rarely bites
    sides = (exact[:, 2] - exact[:, 0])[:, None]
    small = (sides[:, 0] < 30) & (exact[:, 0] > 10) & (exact[:, 2] < size - 10)
    rel = ((box[small, 0::2] - exact[small, 0::2]) / sides[small]).flatten()
    assert 0.06 < float(rel.std()) < 0.12
    assert float((box - exact).abs().mean()) > 0.5


def test_first_prompts_are_points_in_mask_or_boxes():
    gt = _random_masks(200, 64, seed=7)
    state = PromptState.first(gt, torch.tensor([[64, 64]] * 200), 64, _gen(8), capacity=11)
    is_box = state.is_box
    assert 60 < int(is_box.sum()) < 140  # equal chance
    assert (state.labels[is_box, 0] == BOX_TL).all() and (state.labels[is_box, 1] == BOX_BR).all()
    assert (state.labels[~is_box, 0] == FOREGROUND).all() and (state.labels[~is_box, 1] == PAD).all()
    pts = state.coords[~is_box, 0].long()
    assert gt[~is_box][torch.arange(len(pts)), pts[:, 1], pts[:, 0]].all()
    assert torch.equal(state.multimask(), ~is_box)
    # adding a point: single-point samples leave multimask mode, counts grow only where found
    found = torch.arange(200) % 2 == 0
    state.add(torch.ones(200, 2), torch.zeros(200, dtype=torch.long), found)
    assert torch.equal(state.count, torch.where(is_box, 2, 1) + found.long())
    assert not (state.multimask() & found).any()
    groups = state.token_groups()
    assert sum(len(idx) for idx, _ in groups) == 200
    for idx, tokens in groups:
        assert (state.count[idx] + (~state.is_box[idx]).long() == tokens).all()


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SamConfig(encoder=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4,
                                      img_size=128, out_chans=32),
                    prompt=PromptEncoderConfig(embed_dim=32),
                    decoder=MaskDecoderConfig(transformer_dim=32, mlp_dim=64, iou_head_hidden_dim=32))
    return build_sam(cfg).eval()


@torch.no_grad()
def test_decode_tokens_matches_the_reference_prompt_path():
    """Grouped decoding of mixed point / box prompts equals decoding each with embed_prompts."""
    model = _tiny_model()
    emb = torch.randn(3, 32, 8, 8)
    gt = _random_masks(3, 128, seed=9)
    state = PromptState.first(gt, torch.tensor([[128, 128]] * 3), 128, _gen(0), capacity=6, box_prob=0.0)
    state.is_box[1] = True
    state.coords[1, :2] = torch.tensor([[10.0, 12.0], [70.0, 90.0]])
    state.labels[1, :2] = torch.tensor([BOX_TL, BOX_BR])
    state.count[1] = 2
    state.add(torch.tensor([[5.0, 6.0]] * 3), torch.tensor([0, 1, 0]), torch.tensor([False, True, True]))
    mask_in = torch.randn(3, 1, 32, 32)
    logits, iou = decode_tokens(model, emb, state, mask_in)
    for i in range(3):
        n = int(state.count[i])
        if state.is_box[i]:
            box = state.coords[i, :2].reshape(1, 4)
            pts = (state.coords[i:i + 1, 2:n], state.labels[i:i + 1, 2:n]) if n > 2 else None
            sparse, dense = model.embed_prompts(pts, box, mask_in[i:i + 1])
        else:
            sparse, dense = model.embed_prompts((state.coords[i:i + 1, :n], state.labels[i:i + 1, :n]), None,
                                                mask_in[i:i + 1])
        ref_m, ref_q = model.mask_decoder.predict_masks(emb[i:i + 1], model.prompt_encoder.get_dense_pe(), sparse,
                                                        dense)
        assert torch.allclose(logits[i], ref_m[0], atol=1e-4)
        assert torch.allclose(iou[i], ref_q[0], atol=1e-5)
