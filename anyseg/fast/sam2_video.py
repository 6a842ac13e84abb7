"""Fast paths for SAM 2 video tracking, beside the faithful computation of
:mod:`anyseg.modeling.sam2.tracking` (switched on with ``SAM2VideoPredictor(model, speed=...)``).

At steady state the memory attention dominates a tracked frame: each object's 4096 query tokens
attend over about 28,700 memory tokens (seven memories of 4096 tokens plus object-pointer tokens) in
every layer. The faithful path already runs these attentions through fused
``scaled_dot_product_attention`` (never forming the ``4096 x 28,700`` score matrix), as the reference
does. What the fast paths change:

* **Projections of a memory reused across frames.** A memory frame is read by the next seven frames
  (conditioning frames by all of them); only its temporal encoding changes. The key of memory token
  ``n`` of a frame at temporal slot ``t`` is ``rope_n(W_k (m_n + p_n + tau_t) + b)``, which splits into
  ``rope_n(W_k m_n)`` (kept per memory frame and layer while the frame can still be read), ``rope_n(W_k
  p_n + b)`` (per layer, the same for every frame and object) and ``rope_n(W_k tau_t)`` (a rotated
  constant vector per slot). Each frame's keys are then one addition instead of a projection and a
  rotation of 28,700 tokens per layer.
* **Batched objects.** The objects tracked on a frame run through the memory attention, the mask
  decoder and the memory encoder as one batch. Objects whose memories have the same layout (the usual
  case: same number of memory frames and pointers) share one attention call; others run in groups of
  equal layout. The first layer's self-attention and the first cross-attention's queries depend only
  on the frame, so they are computed once for all objects.
* **Cheaper rotary embedding**: ``x * cos + swap(x) * sin`` with tables of the full width, in place of
  the pairwise form (same values up to rounding).
* **Fast image encoder** (:mod:`anyseg.fast.sam2` through :func:`anyseg.speed.apply`) when the model has
  one.
* **bfloat16** (``speed="auto"`` on CPUs with native bfloat16, AMX or AVX512-BF16, and on CUDA): the
  memory attention's products in bfloat16 (layer norms, softmax statistics and the residual stream in
  float32); the cached keys are kept in bfloat16 too. Quality bar: mask IoU >= 0.98 per object and
  frame against the faithful path (``tests/test_sam2_video_fast.py``).

``lossless`` keeps float32 and matches the faithful path to rounding (the golden tolerances).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..modeling.sam2 import Sam2, Sam2Features
from ..modeling.sam2.memory_attention import MemoryAttention, axial_rope_tables
from ..modeling.sam2.position import sine_position_encoding_2d
from ..modeling.sam2.tracking import (FrameOutput, MemoryPlan, Outputs, encode_memory, plan_memory,
                                      use_multimask)

__all__ = ["VideoSpeedConfig", "VideoFastRuntime", "KeyCache", "SPEEDS", "native_bf16"]

#: The values ``SAM2VideoPredictor(speed=...)`` accepts (None means "faithful").
SPEEDS = ("faithful", "lossless", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native (and pay) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    from ..speed import cpu_capabilities

    return bool(cpu_capabilities()["bf16_matmul"])


@dataclass(frozen=True)
class VideoSpeedConfig:
    """Which video fast paths are on.

    name: the preset (``lossless`` or ``auto``).
    dtype: reduced precision of the memory attention's products (None: float32).
    batch_objects: run the objects tracked on a frame as one batch.
    cache_keys: keep each memory frame's rotated key projections while the frame can still be read.
    image_speed: the image encoder's preset for :func:`anyseg.speed.apply` (``lossless`` / ``auto``) when
        the model has no fast paths of its own yet; None leaves the encoder as it is.
    """

    name: str = "lossless"
    dtype: Optional[torch.dtype] = None
    batch_objects: bool = True
    cache_keys: bool = True
    image_speed: Optional[str] = "lossless"

    @classmethod
    def resolve(cls, speed, device) -> Optional["VideoSpeedConfig"]:
        """``None`` / ``"faithful"`` -> None; ``"lossless"``; ``"auto"`` (bfloat16 where native); or a
        config as it is."""
        if speed is None or isinstance(speed, VideoSpeedConfig):
            return speed
        if not isinstance(speed, str) or speed not in SPEEDS:
            raise ValueError(f"speed must be one of {', '.join(SPEEDS)} (or None), got {speed!r}")
        if speed == "faithful":
            return None
        if speed == "lossless":
            return cls(name="lossless")
        dtype = torch.bfloat16 if native_bf16(device) else None
        return cls(name="auto", dtype=dtype, image_speed="auto")


# ----------------------------------------------------------------------------------- rotary helpers
def rope_tables_full(h: int, w: int, dim: int, theta: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables for :func:`rope`: ``cos`` and signed ``sin``, each ``(h*w) x dim`` float32, so
    that ``rope(x) = x * cos + swap(x) * sin`` equals the pairwise rotation of
    :func:`anyseg.modeling.sam2.memory_attention.apply_rope`."""
    cos, sin = axial_rope_tables(h, w, dim, theta, device=device)
    cos2 = cos.repeat_interleave(2, dim=-1)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return cos2.contiguous(), sin2.contiguous()


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x[2m], x[2m+1]) -> (x[2m+1], x[2m])`` along the last dimension."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def rope(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of ``... x N x D`` (float32) by the tables of :func:`rope_tables_full`."""
    return torch.addcmul(x * cos2, swap_pairs(x), sin2)


# --------------------------------------------------------------------------------------- the runtime
class _Entry:
    """Cached rotated key projections of one memory frame: ``layers x HW x C`` (content only)."""

    __slots__ = ("source", "keys", "tick")

    def __init__(self, source: torch.Tensor, keys: torch.Tensor, tick: int) -> None:
        self.source = source  # keeps the stored features alive, so their id is not reused
        self.keys = keys
        self.tick = tick


class KeyCache:
    """Rotated key projections of the memory frames one video's tracking reads (one per inference
    state). Bounded: :meth:`end_frame` forgets the frames the last tracked frame did not read, which
    leaves the conditioning frames and the last few memories."""

    def __init__(self) -> None:
        self._entries: Dict[int, _Entry] = {}
        self._tick = 0

    def get(self, stored: torch.Tensor) -> Optional[torch.Tensor]:
        entry = self._entries.get(id(stored))
        if entry is None or entry.source is not stored:
            return None
        entry.tick = self._tick
        return entry.keys

    def put(self, stored: torch.Tensor, keys: torch.Tensor) -> None:
        self._entries[id(stored)] = _Entry(stored, keys, self._tick)

    def end_frame(self) -> None:
        self._entries = {k: e for k, e in self._entries.items() if e.tick == self._tick}
        self._tick += 1

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.keys.numel() * e.keys.element_size() for e in self._entries.values())


class VideoFastRuntime:
    """The fast paths for one model and one :class:`VideoSpeedConfig`, with their caches.

    Used by :class:`anyseg.video.SAM2VideoPredictor`; the caches are bounded (the memory frames read
    on the last tracked frame, and per-layer tables that depend only on the weights).
    """

    def __init__(self, model: Sam2, config: VideoSpeedConfig) -> None:
        heads = {layer.self_attn.num_heads for layer in model.memory_attention.layers}
        heads |= {layer.cross_attn_image.num_heads for layer in model.memory_attention.layers}
        if heads - {1}:
            raise NotImplementedError(f"the video fast paths need single-head memory attention (SAM 2's), "
                                      f"got {sorted(heads)} heads")
        self.model = model
        self.config = config
        self._tables: Dict[tuple, object] = {}
        self._image_fast = None
        self._setup_image_encoder()

    # ----------------------------------------------------------------------------- image encoder
    def _setup_image_encoder(self) -> None:
        """Use the model's fast image encoder (:mod:`anyseg.fast.sam2`), switching it on with
        :func:`anyseg.speed.apply` if the model has no speed configuration yet."""
        name = self.config.image_speed
        if name is None:
            return
        try:
            from . import sam2 as fast_sam2  # noqa: F401
            from .. import speed as speed_mod
        except ImportError:  # pragma: no cover - the image fast paths are optional
            return
        if getattr(self.model, "speed_runtime", None) is None:
            config = (speed_mod.SpeedConfig.lossless() if name == "lossless"
                      else speed_mod.SpeedConfig.auto(self.model.device))
            try:
                speed_mod.apply(self.model, config)
            except (TypeError, ValueError, NotImplementedError):  # pragma: no cover
                return
        if getattr(self.model, "speed_runtime", None) is not None:
            self._image_fast = fast_sam2.encode

    def encode(self, image: torch.Tensor) -> Sam2Features:
        """Normalised ``1 x 3 x S x S`` frame -> features (float32)."""
        if self._image_fast is not None:
            return self._image_fast(self.model, image)
        return self.model.encode_image(image)

    # ------------------------------------------------------------------------------ weight tables
    def _weights_stamp(self, *params: torch.Tensor) -> tuple:
        from .onednn import version

        return tuple((p.data_ptr(), version(p), p.dtype, p.device) for p in params)

    def _table(self, key, params: Sequence[torch.Tensor], make):
        stamp = self._weights_stamp(*params)
        hit = self._tables.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, make())
            self._tables[key] = hit
        return hit[1]

    def _rope_full(self, hw: int, attn, device) -> Tuple[torch.Tensor, torch.Tensor]:
        h, w = attn.grid_for(hw)
        key = ("rope", h, w, attn.head_dim, attn.rope_theta, str(device))
        hit = self._tables.get(key)
        if hit is None:
            hit = ((), rope_tables_full(h, w, attn.head_dim, attn.rope_theta, device))
            self._tables[key] = hit
        return hit[1]

    def _qkv_self(self, layer):
        a = layer.self_attn
        params = [a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias]

        def make():
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0).contiguous()
            b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], dim=0).contiguous()
            return w, b
        return self._table(("qkv", id(a)), params, make)

    def _position_keys(self, layer, hw: int, mem_dim: int, device) -> torch.Tensor:
        """``rope(W_k p + b)`` of the memory grid for a cross-attention: ``HW x C`` float32."""
        a = layer.cross_attn_image

        def make():
            h, w = a.grid_for(hw)
            pos = sine_position_encoding_2d(h, w, mem_dim, device=device).flatten(1).t()  # HW x mem_dim
            cos2, sin2 = self._rope_full(hw, a, device)
            return rope(F.linear(pos, a.k_proj.weight, a.k_proj.bias), cos2, sin2).contiguous()
        return self._table(("kpos", id(a), hw, mem_dim, str(device)), [a.k_proj.weight, a.k_proj.bias], make)

    # -------------------------------------------------------------------------------- key cache
    def _content_keys(self, attention: MemoryAttention, stored: torch.Tensor, hw: int, device,
                      dtype: torch.dtype, cache: Optional[KeyCache]) -> torch.Tensor:
        """``rope(W_k m)`` of one stored memory frame for every layer: ``layers x HW x C``."""
        use_cache = cache is not None and self.config.cache_keys
        if use_cache:
            keys = cache.get(stored)
            if keys is not None:
                return keys
        m = stored.to(device=device, dtype=torch.float32).flatten(2).transpose(1, 2)[0]  # HW x mem_dim
        outs = []
        for layer in attention.layers:
            a = layer.cross_attn_image
            cos2, sin2 = self._rope_full(hw, a, device)
            outs.append(rope(F.linear(m, a.k_proj.weight), cos2, sin2).to(dtype))
        keys = torch.stack(outs, dim=0)
        if use_cache:
            cache.put(stored, keys)
        return keys

    # -------------------------------------------------------------------------- memory attention
    def memory_attention(self, features: Sam2Features, plans: Sequence[MemoryPlan],
                         cache: Optional[KeyCache] = None) -> torch.Tensor:
        """The memory-conditioned features of ``len(plans)`` objects on one frame: ``B x C x h x w``.

        Computes :class:`~anyseg.modeling.sam2.memory_attention.MemoryAttention` over each plan's memory
        (spec 7), batched over objects, with the cached / shared work of the module docstring.
        """
        model = self.model
        attention = model.memory_attention
        cfg = model.config
        vision = features.vision
        _, c, h, w = vision.shape
        hw = h * w
        device = vision.device
        n_obj = len(plans)
        dtype = self.config.dtype
        kdtype = dtype or torch.float32
        mem_dim = cfg.mem_dim
        num_maskmem = cfg.num_maskmem

        x = vision.flatten(2).transpose(1, 2)  # 1 x HW x C, shared by every object
        if attention.pos_enc_at_input:
            x = x + 0.1 * features.vision_pos.flatten(2).transpose(1, 2)

        # Each object's memory: content keys per frame, slot of each frame, values, pointer tokens.
        layouts = []
        for plan in plans:
            contents = [self._content_keys(attention, stored, hw, device, kdtype, cache)
                        for _, _, stored in plan.frames]
            slots = [num_maskmem - t_pos - 1 for _, t_pos, _ in plan.frames]
            spatial = [stored.to(device=device, dtype=torch.float32).flatten(2).transpose(1, 2)[0]
                       for _, _, stored in plan.frames]
            ptrs = None if plan.obj_ptrs is None else plan.obj_ptrs[0].to(device=device, dtype=torch.float32)
            ptr_pos = None if plan.obj_pos is None else plan.obj_pos[0].to(device=device, dtype=torch.float32)
            values_in = torch.cat(spatial + ([ptrs] if ptrs is not None else []), dim=0)
            layouts.append((contents, slots, values_in, ptrs, ptr_pos))
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, plan in enumerate(plans):
            key = (len(plan.frames), plan.num_ptr_tokens)
            if not self.config.batch_objects:
                key = key + (i,)
            groups.setdefault(key, []).append(i)

        shared = True  # x is the same for every object (1 x HW x C) until the first cross-attention
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                    else torch.autocast(device.type, enabled=False))
        with autocast:
            for li, layer in enumerate(attention.layers):
                x = x + self._self_attention(layer, x, hw, device)
                a = layer.cross_attn_image
                cos2, sin2 = self._rope_full(hw, a, device)
                t = layer.norm2(x)
                q = rope(F.linear(t, a.q_proj.weight, a.q_proj.bias).float(), cos2, sin2)
                kpos = self._position_keys(layer, hw, mem_dim, device)
                # rope(W_k tau_s) for the temporal slots in use: a constant vector rotated per token.
                slot_keys: Dict[int, torch.Tensor] = {}
                out = None
                for idx in groups.values():
                    # Keys and values of the group's objects written in place (no per-object copies).
                    n_keys = layouts[idx[0]][2].shape[0]
                    k = torch.empty(len(idx), n_keys, c, device=device, dtype=kdtype)
                    v = torch.empty(len(idx), n_keys, c, device=device, dtype=kdtype)
                    for j, i in enumerate(idx):
                        contents, slots, values_in, ptrs, ptr_pos = layouts[i]
                        start = 0
                        for content, s in zip(contents, slots):
                            pk = slot_keys.get(s)
                            if pk is None:
                                u = F.linear(model.maskmem_tpos_enc[s].reshape(1, -1).float(), a.k_proj.weight)
                                pk = slot_keys[s] = kpos + rope(u.expand(hw, -1), cos2, sin2)
                            torch.add(content[li], pk, out=k[j, start:start + hw])
                            start += hw
                        if ptrs is not None:
                            k[j, start:] = F.linear(ptrs + ptr_pos, a.k_proj.weight, a.k_proj.bias)
                        if dtype is None:
                            torch.addmm(a.v_proj.bias, values_in, a.v_proj.weight.t(), out=v[j])
                        else:
                            v[j] = F.linear(values_in, a.v_proj.weight, a.v_proj.bias)
                    k, v = k.unsqueeze(1), v.unsqueeze(1)
                    qg = q.expand(len(idx), -1, -1) if shared else q[idx]
                    qg = qg.to(kdtype).unsqueeze(1)
                    o = F.scaled_dot_product_attention(qg, k, v)[:, 0]
                    o = F.linear(o, a.out_proj.weight, a.out_proj.bias).float()
                    if len(idx) == n_obj:
                        out = o
                    else:
                        if out is None:
                            out = torch.empty(n_obj, hw, c, device=device, dtype=torch.float32)
                        out[idx] = o
                x = x + out  # B x HW x C from here on
                shared = False
                t = layer.norm3(x)
                x = x + layer.linear2(F.relu(layer.linear1(t))).float()
            x = attention.norm(x.float())
        return x.transpose(1, 2).reshape(n_obj, c, h, w).float()

    def _self_attention(self, layer, x: torch.Tensor, hw: int, device) -> torch.Tensor:
        a = layer.self_attn
        cos2, sin2 = self._rope_full(hw, a, device)
        t = layer.norm1(x)
        wqkv, bqkv = self._qkv_self(layer)
        qkv = F.linear(t, wqkv, bqkv)
        c = a.num_heads * a.head_dim
        q = rope(qkv[..., :c].float(), cos2, sin2)
        k = rope(qkv[..., c:2 * c].float(), cos2, sin2)
        v = qkv[..., 2 * c:]
        dtype = self.config.dtype or torch.float32
        o = F.scaled_dot_product_attention(q.to(dtype).unsqueeze(1), k.to(dtype).unsqueeze(1),
                                           v.to(dtype).unsqueeze(1))[:, 0]
        return F.linear(o, a.out_proj.weight, a.out_proj.bias).float()

    # ------------------------------------------------------------------------------ tracking steps
    def condition(self, cache: Optional[KeyCache] = None):
        """A drop-in for :func:`~anyseg.modeling.sam2.tracking.condition_on_memory` (one object), for
        ``track_step(..., condition=...)``."""
        def condition(model: Sam2, frame_idx: int, is_init_cond_frame: bool, features: Sam2Features,
                      cond_outputs: Outputs, non_cond_outputs: Outputs, num_frames: int,
                      reverse: bool = False) -> torch.Tensor:
            if is_init_cond_frame:
                return model.image_embedding(features)
            plan = plan_memory(model, frame_idx, cond_outputs, non_cond_outputs, num_frames, reverse,
                               device=features.vision.device)
            return self.memory_attention(features, [plan], cache)
        return condition

    def track_objects(self, frame_idx: int, features: Sam2Features, objects: Sequence[Tuple[Outputs, Outputs]],
                      num_frames: int, reverse: bool = False, cache: Optional[KeyCache] = None
                      ) -> List[FrameOutput]:
        """Track several objects on a frame without prompts (spec 8.1 with memory, memory encoder on):
        ``objects`` holds each object's ``(cond_outputs, non_cond_outputs)``. Returns their records."""
        model = self.model
        cfg = model.config
        plans = [plan_memory(model, frame_idx, cond, non_cond, num_frames, reverse, device=features.vision.device)
                 for cond, non_cond in objects]
        embedding = self.memory_attention(features, plans, cache)
        heads = model.sam_heads(embedding, high_res_features=features.high_res,
                                multimask_output=use_multimask(model, False, 0))
        maskmem = None
        if cfg.num_maskmem > 0:
            maskmem = encode_memory(model, features, heads.high_res_masks, heads.object_score,
                                    is_mask_from_pts=False)
        pred = heads.low_res_masks
        if cfg.fill_hole_area > 0:
            from ..masks import fill_holes_in_logits

            pred = fill_holes_in_logits(pred, cfg.fill_hole_area)
        outs = []
        for i in range(len(objects)):
            # Clones: a stored slice would keep the whole batch alive (and be saved whole when spilled).
            outs.append(FrameOutput(pred[i:i + 1].clone(), heads.obj_ptr[i:i + 1].clone(),
                                    heads.object_score[i:i + 1].clone(),
                                    None if maskmem is None else maskmem[i:i + 1].clone()))
        return outs
