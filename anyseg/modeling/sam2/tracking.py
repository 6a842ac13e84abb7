"""One tracking step of SAM 2 for one object on one frame (spec/sam2.md section 8): assemble the
object's memory, condition the frame's feature on it, decode, and encode the result into a new memory.

The functions take the model and plain per-frame records; the video layer (``anyseg.video``) owns the
state machine and decides what is kept. A stored per-frame record (:class:`FrameOutput`) holds what
later frames may read: the bfloat16 memory features, the object pointer, the object score and the
low-res logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .position import sine_position_encoding_1d
from .sam2 import HeadsOutput, Sam2, Sam2Features


@dataclass
class FrameOutput:
    """What is stored per frame and object (the reference's compact output).

    pred_masks: ``1 x 1 x 256 x 256`` low-res logits (after hole filling, if on).
    obj_ptr: ``1 x 256``. object_score: ``1 x 1``.
    maskmem_features: ``1 x 64 x 64 x 64`` bfloat16, or None until the memory encoder ran.
    """

    pred_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor
    maskmem_features: Optional[torch.Tensor] = None


#: A read-only view of an object's stored outputs: frame index -> FrameOutput (may load lazily).
Outputs = Mapping[int, FrameOutput]


def select_closest_cond_frames(frame_idx: int, cond: Mapping[int, FrameOutput], max_num: int
                               ) -> Tuple[Dict[int, FrameOutput], Dict[int, FrameOutput]]:
    """The conditioning frames used as memories (all, or with ``max_num >= 2`` the closest before, the
    closest at/after and then the nearest others) and the unselected ones."""
    if max_num == -1 or len(cond) <= max_num:
        return dict(cond), {}
    if max_num < 2:
        raise ValueError("max_cond_frames_in_attn must be -1 or at least 2")
    selected: Dict[int, FrameOutput] = {}
    before = max((t for t in cond if t < frame_idx), default=None)
    if before is not None:
        selected[before] = cond[before]
    after = min((t for t in cond if t >= frame_idx), default=None)
    if after is not None:
        selected[after] = cond[after]
    remaining = max_num - len(selected)
    others = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame_idx))[:remaining]
    selected.update((t, cond[t]) for t in others)
    unselected = {t: v for t, v in cond.items() if t not in selected}
    return selected, unselected


def memory_position(model: Sam2, features: torch.Tensor) -> torch.Tensor:
    """The memory encoder's sine position encoding for features of this shape (``1 x 64 x h x w``)."""
    h, w = features.shape[-2:]
    from .position import sine_position_encoding_2d

    return sine_position_encoding_2d(h, w, features.shape[1], device=features.device, dtype=torch.float32)[None]


def pointer_positions(model: Sam2, distances: List[int], max_ptrs: int, device) -> torch.Tensor:
    """Temporal encodings of the object pointers, ``N x mem_dim`` (zeros without 2.1's encoding)."""
    cfg = model.config
    if not cfg.add_tpos_enc_to_obj_ptrs:
        return torch.zeros(len(distances), cfg.mem_dim, device=device)
    # A one-frame video would divide by 0 (the reference gives NaN); 1 keeps the encoding defined.
    t_diff_max = max(1, max_ptrs - 1)
    pos = torch.tensor(distances, device=device) / t_diff_max
    dim = cfg.transformer_dim if cfg.proj_tpos_enc_in_obj_ptrs else cfg.mem_dim
    return model.obj_ptr_tpos_proj(sine_position_encoding_1d(pos, dim))


@dataclass
class MemoryPlan:
    """What one object's memory attention reads on one frame (spec 8.2 / 8.3), before concatenation.

    frames: ``(frame_idx, t_pos, maskmem_features)`` of each spatial memory in concatenation order
        (conditioning frames first with ``t_pos = 0``, then ``t_pos = 1..M-1``); features
        ``1 x mem_dim x h x w`` as stored (bfloat16).
    obj_ptrs: ``1 x N_ptr x mem_dim`` object-pointer tokens (float32) or None.
    obj_pos: ``1 x N_ptr x mem_dim`` their temporal position encodings, or None.
    """

    frames: List[Tuple[int, int, torch.Tensor]]
    obj_ptrs: Optional[torch.Tensor] = None
    obj_pos: Optional[torch.Tensor] = None

    @property
    def num_ptr_tokens(self) -> int:
        return 0 if self.obj_ptrs is None else int(self.obj_ptrs.shape[1])


def plan_memory(model: Sam2, frame_idx: int, cond_outputs: Outputs, non_cond_outputs: Outputs, num_frames: int,
                reverse: bool = False, *, device=None) -> MemoryPlan:
    """Select the memories and object pointers an object reads on frame ``frame_idx`` (not an initial
    conditioning frame): spec 8.2 and 8.3."""
    cfg = model.config
    if len(cond_outputs) == 0:
        raise RuntimeError(f"frame {frame_idx}: the object has no conditioning frame to track from")
    device = model.device if device is None else device
    selected, unselected = select_closest_cond_frames(frame_idx, cond_outputs, cfg.max_cond_frames_in_attn)
    frames: List[Tuple[int, int, Optional[FrameOutput]]] = [(t, 0, out) for t, out in selected.items()]
    stride = cfg.memory_temporal_stride_for_eval
    num_maskmem = cfg.num_maskmem
    for t_pos in range(1, num_maskmem):
        t_rel = num_maskmem - t_pos
        if t_rel == 1:
            prev = frame_idx + t_rel if reverse else frame_idx - t_rel
        elif not reverse:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        else:
            prev = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
        out = non_cond_outputs.get(prev)
        if out is None:
            out = unselected.get(prev)
        frames.append((prev, t_pos, out))
    plan = MemoryPlan([])
    for t, t_pos, out in frames:
        if out is None:
            continue
        feats = out.maskmem_features
        if feats is not None:
            plan.frames.append((t, t_pos, feats))

    if cfg.use_obj_ptrs_in_encoder:
        max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
        if cfg.only_obj_ptrs_in_the_past_for_eval:
            ptr_cond = {t: o for t, o in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
        else:
            ptr_cond = selected
        sign = -1 if reverse else 1
        distances, ptrs = [], []
        for t, out in ptr_cond.items():
            distances.append((frame_idx - t) * sign if cfg.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t))
            ptrs.append(out.obj_ptr)
        for t_diff in range(1, max_ptrs):
            t = frame_idx + t_diff if reverse else frame_idx - t_diff
            if t < 0 or t >= num_frames:
                break
            out = non_cond_outputs.get(t)
            if out is None:
                out = unselected.get(t)
            if out is not None:
                distances.append(t_diff)
                ptrs.append(out.obj_ptr)
        if ptrs:
            obj_ptrs = torch.stack([p.to(device) for p in ptrs], dim=0)  # N x B x C
            b = obj_ptrs.shape[1]
            c = obj_ptrs.shape[2]
            obj_pos = pointer_positions(model, distances, max_ptrs, device)  # N x mem_dim
            obj_pos = obj_pos.unsqueeze(1).expand(-1, b, cfg.mem_dim)
            mem_dim = cfg.mem_dim
            if mem_dim < c:
                # Each pointer becomes C / mem_dim tokens (channel chunks in order).
                split = c // mem_dim
                obj_ptrs = obj_ptrs.reshape(-1, b, split, mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos.repeat_interleave(split, dim=0)
            plan.obj_ptrs = obj_ptrs.permute(1, 0, 2)
            plan.obj_pos = obj_pos.permute(1, 0, 2)
    return plan


def memory_tensors(model: Sam2, plan: MemoryPlan, device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The concatenated memory of a plan: ``(memory, memory_pos, num_ptr_tokens)``, each ``1 x N_m x mem_dim``
    float32 (the spatial memories widened from their stored bfloat16)."""
    num_maskmem = model.config.num_maskmem
    memories: List[torch.Tensor] = []
    positions: List[torch.Tensor] = []
    for _, t_pos, stored in plan.frames:
        # Memories are stored in bfloat16 and widened back for the attention.
        feats = stored.to(device=device, dtype=torch.float32)
        memories.append(feats.flatten(2).permute(0, 2, 1))
        pos = memory_position(model, feats).flatten(2).permute(0, 2, 1)
        positions.append(pos + model.maskmem_tpos_enc[num_maskmem - t_pos - 1].reshape(1, 1, -1))
    if plan.obj_ptrs is not None:
        memories.append(plan.obj_ptrs)
        positions.append(plan.obj_pos)
    return torch.cat(memories, dim=1), torch.cat(positions, dim=1), plan.num_ptr_tokens


def condition_on_memory(model: Sam2, frame_idx: int, is_init_cond_frame: bool, features: Sam2Features,
                        cond_outputs: Outputs, non_cond_outputs: Outputs, num_frames: int,
                        reverse: bool = False) -> torch.Tensor:
    """The decoder's image embedding for this frame: ``vision + no_mem_embed`` on an initial
    conditioning frame, else the memory attention output over the object's memory (``1 x 256 x 64 x 64``)."""
    vision = features.vision
    b, c, h, w = vision.shape
    if is_init_cond_frame:
        return model.image_embedding(features)
    plan = plan_memory(model, frame_idx, cond_outputs, non_cond_outputs, num_frames, reverse, device=vision.device)
    memory, memory_pos, num_ptr_tokens = memory_tensors(model, plan, vision.device)
    curr = vision.flatten(2).permute(0, 2, 1)
    curr_pos = features.vision_pos.flatten(2).permute(0, 2, 1).expand(b, -1, -1)
    out = model.memory_attention(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=num_ptr_tokens)
    return out.permute(0, 2, 1).reshape(b, c, h, w)


def use_multimask(model: Sam2, is_init_cond_frame: bool, num_points: int) -> bool:
    cfg = model.config
    return (cfg.multimask_output_in_sam and (is_init_cond_frame or cfg.multimask_output_for_tracking)
            and cfg.multimask_min_pt_num <= num_points <= cfg.multimask_max_pt_num)


def encode_memory(model: Sam2, features: Sam2Features, high_res_masks: torch.Tensor, object_score: torch.Tensor,
                  is_mask_from_pts: bool) -> torch.Tensor:
    """Memory features of a ``1 x 1 x S x S`` mask logit map, rounded to bfloat16 (``1 x 64 x 64 x 64``)."""
    cfg = model.config
    if cfg.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts:
        mask = (high_res_masks > 0).float()
    else:
        mask = torch.sigmoid(high_res_masks)
    mask = mask * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
    feats, _ = model.memory_encoder(features.vision, mask, skip_mask_sigmoid=True)
    if cfg.no_obj_embed_spatial:
        absent = 1 - (object_score > 0).float()
        feats = feats + absent[..., None, None] * model.no_obj_embed_spatial[..., None, None]
    return feats.to(torch.bfloat16)


def track_step(model: Sam2, frame_idx: int, is_init_cond_frame: bool, features: Sam2Features,
               cond_outputs: Outputs, non_cond_outputs: Outputs, num_frames: int, *,
               point_coords: Optional[torch.Tensor] = None, point_labels: Optional[torch.Tensor] = None,
               mask_inputs: Optional[torch.Tensor] = None, reverse: bool = False, run_mem_encoder: bool = True,
               prev_mask_logits: Optional[torch.Tensor] = None,
               condition: Optional[Callable[..., torch.Tensor]] = None) -> Tuple[FrameOutput, HeadsOutput]:
    """Spec 8.1 for one object: points (model frame) or a ``1 x 1 x S x S`` mask prompt, or neither
    (tracking). Returns the stored record (hole filling applied to its logits, memory encoded when
    ``run_mem_encoder``) and the raw heads output.

    ``condition``: replaces :func:`condition_on_memory` (same arguments after ``model``), e.g. a fast
    path's memory attention (:mod:`anyseg.fast.sam2_video`)."""
    cfg = model.config
    if mask_inputs is not None and cfg.use_mask_input_as_output_without_sam:
        heads = model.mask_as_output(features.vision, features.high_res, mask_inputs)
    else:
        embedding = (condition or condition_on_memory)(model, frame_idx, is_init_cond_frame, features,
                                                       cond_outputs, non_cond_outputs, num_frames, reverse)
        if prev_mask_logits is not None:
            mask_inputs = prev_mask_logits
        num_points = 0 if point_labels is None else point_labels.shape[1]
        heads = model.sam_heads(embedding, point_coords, point_labels, mask_inputs, features.high_res,
                                multimask_output=use_multimask(model, is_init_cond_frame, num_points))
    maskmem = None
    if run_mem_encoder and cfg.num_maskmem > 0:
        maskmem = encode_memory(model, features, heads.high_res_masks, heads.object_score,
                                is_mask_from_pts=point_coords is not None)
    pred_masks = heads.low_res_masks
    if cfg.fill_hole_area > 0:
        from ...masks import fill_holes_in_logits

        pred_masks = fill_holes_in_logits(pred_masks, cfg.fill_hole_area)
    return FrameOutput(pred_masks, heads.obj_ptr, heads.object_score, maskmem), heads


def memory_for_prompted_frame(model: Sam2, features: Sam2Features, out: FrameOutput) -> torch.Tensor:
    """Memory of a frame the user prompted, encoded when tracking starts (spec 8.4): the stored
    low-res logits upsampled to ``S x S`` (binarised with the video builder's settings)."""
    s = model.img_size
    high_res = F.interpolate(out.pred_masks.float(), size=(s, s), mode="bilinear", align_corners=False)
    return encode_memory(model, features, high_res, out.object_score, is_mask_from_pts=True)
