"""SAM2VideoPredictor: click an object on one frame, get its mask on every frame (spec/sam2.md section 9).

The reference API and semantics (December 2024 release): objects are tracked independently, sharing
only the frame features, so objects can be added at any time. Unlike the reference, frames are decoded
on demand (never all held) and only what the memory can still read is kept in memory; the rest of each
object's outputs is spilled to a temporary directory (see :mod:`anyseg.video.store`). Results are the
reference's.

Masks returned by every call are ``N_obj x 1 x H x W`` float logits at the video's resolution
(``> 0`` is the mask); absent objects read -1024.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.sam2 import NO_OBJ_SCORE, Sam2, Sam2Features
from ..modeling.sam2.tracking import FrameOutput, memory_for_prompted_frame, track_step
from .store import OutputStore, SpillDir, TrackedFrames

__all__ = ["SAM2VideoPredictor", "InferenceState"]


class _ObjectState:
    """Prompts and outputs of one object."""

    def __init__(self, spill: Optional[SpillDir], keep: int, keep_pointers: int, num_frames: int) -> None:
        self.point_inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask_inputs: Dict[int, torch.Tensor] = {}
        # Conditioning outputs are few and always read: kept in memory.
        self.cond = OutputStore(None, name="cond")
        self.non_cond = OutputStore(spill, keep_in_memory=keep, name="noncond", pointers_in_memory=keep_pointers)
        self.temp_cond: Dict[int, FrameOutput] = {}
        self.temp_non_cond: Dict[int, FrameOutput] = {}
        self.frames_tracked = TrackedFrames(num_frames)  # frame -> tracked in reverse

    def temp(self, is_cond: bool) -> Dict[int, FrameOutput]:
        return self.temp_cond if is_cond else self.temp_non_cond

    def stored(self, is_cond: bool) -> OutputStore:
        return self.cond if is_cond else self.non_cond


class InferenceState:
    """Everything one video's tracking needs. Also readable like the reference's dict for the common
    keys (``num_frames``, ``video_height``, ``video_width``, ``obj_ids``, ``device``)."""

    def __init__(self, frames, device: torch.device, spill: Optional[SpillDir], keep: int,
                 key_cache=None, keep_pointers: Optional[int] = None) -> None:
        self.frames = frames
        self.num_frames = int(frames.num_frames)
        self.video_height = int(frames.height)
        self.video_width = int(frames.width)
        self.device = device
        self.spill = spill
        self.keep = keep
        self.keep_pointers = keep_pointers
        self.objects: Dict[Hashable, _ObjectState] = {}  # insertion order = object index
        self.cached_frame: Optional[int] = None
        self.cached_features: Optional[Sam2Features] = None
        # Fast paths only: memory frames' key projections kept across frames (anyseg.fast.sam2_video).
        self.key_cache = key_cache

    @property
    def obj_ids(self) -> List[Hashable]:
        return list(self.objects)

    def obj(self, obj_id: Hashable) -> _ObjectState:
        """The object's state, created on first use (as the reference does)."""
        state = self.objects.get(obj_id)
        if state is None:
            state = self.objects[obj_id] = _ObjectState(self.spill, self.keep, self.keep_pointers, self.num_frames)
        return state

    def __getitem__(self, key: str) -> Any:
        if key in ("num_frames", "video_height", "video_width", "obj_ids", "device"):
            return getattr(self, key)
        if key == "obj_id_to_idx":
            return {obj_id: i for i, obj_id in enumerate(self.objects)}
        raise KeyError(key)

    def close(self) -> None:
        """Release the frame source and the spilled outputs."""
        closer = getattr(self.frames, "close", None)
        if closer is not None:
            closer()
        for obj in self.objects.values():
            obj.non_cond.close()
        if self.spill is not None:
            self.spill.close()
        if self.key_cache is not None:
            self.key_cache.clear()


class SAM2VideoPredictor:
    """Track objects through a video with a SAM 2 model.

    Args:
        model: a :class:`~anyseg.modeling.sam2.Sam2`; built with the video builder's settings
            (``Sam2Config.for_video()``: binarised prompted masks for memory, hole filling of 8 px), as
            :func:`anyseg.build_sam2_video_predictor` and ``load_model(..., video=True)`` do.
        fill_hole_area, non_overlap_masks, clear_non_cond_mem_around_input,
        add_all_frames_to_correct_as_cond: the reference's options.
        keep_all_outputs: keep every frame's outputs in memory as the reference does (default: spill
            what the memory can no longer read to a temporary directory).
        spill_dir: parent directory for spilled outputs (default: the system's temporary directory).
        outputs_in_memory: per object, how many frames keep their large outputs in memory (default:
            what the next frame's memory reads, ``num_maskmem + 2``); the rest is spilled.
        speed: ``None`` / ``"faithful"`` (default): the reference computation. ``"lossless"``: the fast
            paths of :mod:`anyseg.fast.sam2_video` in float32 (objects of a frame batched, memory key
            projections reused across frames, the model's fast image encoder), equal to the faithful
            path to rounding. ``"auto"``: lossless plus bfloat16 memory attention where the hardware has
            native bfloat16 (quality bar: mask IoU >= 0.98 against faithful). Also a
            :class:`anyseg.fast.sam2_video.VideoSpeedConfig`. The fast image encoder is switched on
            with :func:`anyseg.speed.apply` for the whole model if it has no speed setting yet.
    """

    def __init__(self, model: Sam2, fill_hole_area: Optional[int] = None, non_overlap_masks: bool = False,
                 clear_non_cond_mem_around_input: bool = False, add_all_frames_to_correct_as_cond: bool = False,
                 *, keep_all_outputs: bool = False, spill_dir: Optional[str] = None,
                 outputs_in_memory: Optional[int] = None, speed=None, **kwargs) -> None:
        if not isinstance(model, Sam2):
            raise TypeError(f"SAM2VideoPredictor needs a SAM 2 model, got {type(model).__name__}")
        if clear_non_cond_mem_around_input:
            raise NotImplementedError("clear_non_cond_mem_around_input is not supported "
                                      "(the reference release raises on it as well)")
        if fill_hole_area is not None and fill_hole_area != model.config.fill_hole_area:
            from dataclasses import replace

            model.config = replace(model.config, fill_hole_area=int(fill_hole_area))
        self.model = model
        self.non_overlap_masks = bool(non_overlap_masks)
        self.add_all_frames_to_correct_as_cond = bool(add_all_frames_to_correct_as_cond)
        self.keep_all_outputs = bool(keep_all_outputs)
        self.spill_dir = spill_dir
        cfg = model.config
        # Large parts of the last few outputs stay in memory: what the next frame's memory reads.
        default_keep = cfg.num_maskmem * max(1, cfg.memory_temporal_stride_for_eval) + 2
        self._keep = default_keep if outputs_in_memory is None else int(outputs_in_memory)
        # Object pointers (about 1 KiB a frame) of the frames the next pointers reach stay in memory.
        self._keep_pointers = max(self._keep, cfg.max_obj_ptrs_in_encoder + 2)
        if self._keep < 1:
            raise ValueError(f"outputs_in_memory must be at least 1, got {outputs_in_memory}")
        self.speed = None
        self._fast = None
        if speed is not None and speed != "faithful":
            from ..fast.sam2_video import VideoFastRuntime, VideoSpeedConfig

            self.speed = VideoSpeedConfig.resolve(speed, model.device)
            self._fast = VideoFastRuntime(model, self.speed)

    @property
    def image_size(self) -> int:
        return self.model.img_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -------------------------------------------------------------------------------------- state
    @torch.inference_mode()
    def init_state(self, video_path, offload_video_to_cpu: bool = False, offload_state_to_cpu: bool = False,
                   async_loading_frames: bool = False, *, lookahead: int = 2) -> InferenceState:
        """Open a video: a folder of JPEG frames, a video file, raw video bytes, or a list / iterator of
        ``H x W x 3`` uint8 RGB frames (or an already opened frame source). Frames are decoded when
        needed. The offload / async options are accepted for compatibility: frames are never all held,
        so there is nothing to offload."""
        from .frames import open_frames

        frames = open_frames(video_path, image_size=self.image_size, lookahead=lookahead)
        if frames.num_frames == 0:
            raise RuntimeError(f"no frames found in {video_path!r}")
        spill = None if self.keep_all_outputs else SpillDir(self.spill_dir)
        key_cache = None
        if self._fast is not None:
            from ..fast.sam2_video import KeyCache

            key_cache = KeyCache()
        state = InferenceState(frames, self.device, spill, self._keep, key_cache, self._keep_pointers)
        self._features(state, 0)
        return state

    def reset_state(self, inference_state: InferenceState) -> None:
        """Remove every object, prompt and output; the frames and the feature cache stay."""
        for obj in inference_state.objects.values():
            obj.cond.clear()
            obj.non_cond.clear()
        inference_state.objects.clear()
        if inference_state.key_cache is not None:
            inference_state.key_cache.clear()

    # ------------------------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def add_new_points_or_box(self, inference_state: InferenceState, frame_idx: int, obj_id: Hashable,
                              points=None, labels=None, clear_old_points: bool = True,
                              normalize_coords: bool = True, box=None):
        """Add clicks (``N x 2`` XY, labels 1 / 0) and/or a box (XYXY) for an object on a frame.

        Coordinates are pixels of the video frame (or [0, 1] with ``normalize_coords=False``).
        Returns ``(frame_idx, obj_ids, masks N_obj x 1 x H x W)``.
        """
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be provided together")
        if points is None and box is None:
            raise ValueError("at least one of points or box must be provided as input")
        pts = torch.zeros(0, 2) if points is None else torch.as_tensor(np.asarray(points, dtype=np.float32))
        lbl = torch.zeros(0, dtype=torch.int32) if labels is None else torch.as_tensor(np.asarray(labels)).to(torch.int32)
        if pts.ndim == 2:
            pts = pts[None]
        if lbl.ndim == 1:
            lbl = lbl[None]
        if pts.ndim != 3 or pts.shape[-1] != 2 or lbl.shape != pts.shape[:2]:
            raise ValueError(f"points must be N x 2 with one label each, got points {tuple(pts.shape)} "
                             f"and labels {tuple(lbl.shape)}")
        if not torch.isfinite(pts).all():
            raise ValueError("points contain NaN or infinite values")
        if box is not None:
            if not clear_old_points:
                raise ValueError("cannot add box without clearing old points, since box prompt must be provided "
                                 "before any point prompt (please use clear_old_points=True instead)")
            box_t = torch.as_tensor(np.asarray(box, dtype=np.float32))
            if box_t.numel() != 4:
                raise ValueError(f"box must be 4 numbers X0, Y0, X1, Y1, got shape {tuple(box_t.shape)}")
            pts = torch.cat([box_t.reshape(1, 2, 2), pts], dim=1)
            lbl = torch.cat([torch.tensor([[2, 3]], dtype=torch.int32), lbl], dim=1)
        if normalize_coords:
            pts = pts / torch.tensor([state.video_width, state.video_height])
        pts = (pts * self.image_size).to(state.device)
        lbl = lbl.to(state.device)

        obj = state.obj(obj_id)
        if not clear_old_points and frame_idx in obj.point_inputs:
            old_pts, old_lbl = obj.point_inputs[frame_idx]
            pts, lbl = torch.cat([old_pts, pts], dim=1), torch.cat([old_lbl, lbl], dim=1)
        obj.point_inputs[frame_idx] = (pts, lbl)
        obj.mask_inputs.pop(frame_idx, None)

        is_init = frame_idx not in obj.frames_tracked
        reverse = False if is_init else obj.frames_tracked[frame_idx]
        is_cond = is_init or self.add_all_frames_to_correct_as_cond
        prev = obj.temp(is_cond).get(frame_idx)
        if prev is None:
            prev = obj.cond.get(frame_idx)
        if prev is None:
            prev = obj.non_cond.get(frame_idx)
        prev_logits = None
        if prev is not None and prev.pred_masks is not None:
            prev_logits = torch.clamp(prev.pred_masks.to(state.device), -32.0, 32.0)
        out = self._run(state, obj, frame_idx, is_init, point_coords=pts, point_labels=lbl, reverse=reverse,
                        run_mem_encoder=False, prev_mask_logits=prev_logits)
        obj.temp(is_cond)[frame_idx] = out
        return frame_idx, state.obj_ids, self._consolidated(state, frame_idx, is_cond)

    # The reference's older name.
    add_new_points = add_new_points_or_box

    @torch.inference_mode()
    def add_new_mask(self, inference_state: InferenceState, frame_idx: int, obj_id: Hashable, mask):
        """Give an object's mask on a frame (``H' x W'`` bool / 0-1, any size; resized to the model's
        square). Returns ``(frame_idx, obj_ids, masks)``."""
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        m = torch.as_tensor(np.asarray(mask)).to(torch.bool)
        if m.ndim != 2:
            raise ValueError(f"mask must be a 2-D H x W array, got shape {tuple(m.shape)}")
        m = m[None, None].float().to(state.device)
        s = self.image_size
        if tuple(m.shape[-2:]) != (s, s):
            m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        obj = state.obj(obj_id)
        obj.mask_inputs[frame_idx] = m
        obj.point_inputs.pop(frame_idx, None)
        is_init = frame_idx not in obj.frames_tracked
        reverse = False if is_init else obj.frames_tracked[frame_idx]
        is_cond = is_init or self.add_all_frames_to_correct_as_cond
        out = self._run(state, obj, frame_idx, is_init, mask_inputs=m, reverse=reverse, run_mem_encoder=False)
        obj.temp(is_cond)[frame_idx] = out
        return frame_idx, state.obj_ids, self._consolidated(state, frame_idx, is_cond)

    @torch.inference_mode()
    def clear_all_prompts_in_frame(self, inference_state: InferenceState, frame_idx: int, obj_id: Hashable,
                                   need_output: bool = True):
        """Remove an object's prompts on a frame; its conditioning output there becomes an ordinary one."""
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        obj = state.obj(obj_id)
        obj.point_inputs.pop(frame_idx, None)
        obj.mask_inputs.pop(frame_idx, None)
        obj.temp_cond.pop(frame_idx, None)
        obj.temp_non_cond.pop(frame_idx, None)
        out = obj.cond.get(frame_idx)
        if out is not None:
            obj.non_cond[frame_idx] = out
            del obj.cond[frame_idx]
            obj.frames_tracked.pop(frame_idx, None)
        if not need_output:
            return None
        is_cond = any(frame_idx in o.temp_cond for o in state.objects.values())
        return frame_idx, state.obj_ids, self._consolidated(state, frame_idx, is_cond)

    @torch.inference_mode()
    def remove_object(self, inference_state: InferenceState, obj_id: Hashable, strict: bool = False,
                      need_output: bool = True):
        """Remove an object. Returns ``(obj_ids, [(frame_idx, masks), ...])`` for the frames it had
        prompts on (unknown id: nothing, or RuntimeError with ``strict``)."""
        state = inference_state
        if obj_id not in state.objects:
            if not strict:
                return state.obj_ids, []
            raise RuntimeError(f"cannot remove object id {obj_id!r}: it does not exist; "
                               f"existing ids are {state.obj_ids}")
        if len(state.objects) == 1:
            self.reset_state(state)
            return state.obj_ids, []
        obj = state.objects[obj_id]
        frames = sorted(set(obj.point_inputs) | set(obj.mask_inputs))
        for frame_idx in frames:
            self.clear_all_prompts_in_frame(state, frame_idx, obj_id, need_output=False)
        obj.cond.clear()
        obj.non_cond.clear()
        del state.objects[obj_id]
        updated = []
        if need_output:
            for frame_idx in frames:
                is_cond = any(frame_idx in o.temp_cond for o in state.objects.values())
                updated.append((frame_idx, self._consolidated(state, frame_idx, is_cond)))
        return state.obj_ids, updated

    # -------------------------------------------------------------------------------- propagation
    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: InferenceState) -> None:
        """Commit the prompted frames' outputs (encoding their memories) before tracking."""
        state = inference_state
        if not state.objects:
            raise RuntimeError("No input points or masks are provided for any object; please add inputs first.")
        for obj_id, obj in state.objects.items():
            for is_cond in (False, True):
                temp = obj.temp(is_cond)
                for frame_idx, out in temp.items():
                    if out.maskmem_features is None:
                        features = self._features(state, frame_idx)
                        out.maskmem_features = memory_for_prompted_frame(self.model, features, out)
                    obj.stored(is_cond)[frame_idx] = out
                temp.clear()
            if len(obj.cond) == 0:
                raise RuntimeError(f"No input points or masks are provided for object id {obj_id}; "
                                   "please add inputs first.")
            for frame_idx in list(obj.cond):
                obj.non_cond.pop(frame_idx, None)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: InferenceState, start_frame_idx: Optional[int] = None,
                           max_frame_num_to_track: Optional[int] = None, reverse: bool = False,
                           ) -> Iterator[Tuple[int, List[Hashable], torch.Tensor]]:
        """Track every object; yields ``(frame_idx, obj_ids, masks N_obj x 1 x H x W)`` per frame.

        Forward from ``start_frame_idx`` (default: the earliest prompted frame) through
        ``start + max_frame_num_to_track`` (so ``max + 1`` frames), or backwards with ``reverse``.
        """
        state = inference_state
        self.propagate_in_video_preflight(state)
        num_frames = state.num_frames
        if start_frame_idx is None:
            start_frame_idx = min(t for obj in state.objects.values() for t in obj.cond)
        start_frame_idx = self._check_frame(state, start_frame_idx)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if max_frame_num_to_track < 0:
            raise ValueError(f"max_frame_num_to_track must be >= 0, got {max_frame_num_to_track}")
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else range(0)
        else:
            end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            order = range(start_frame_idx, end + 1)
        for frame_idx in order:
            per_obj = []
            tracked = []  # objects without a conditioning output here, run as one batch on a fast path
            for obj in state.objects.values():
                stored = obj.cond.get(frame_idx)
                if stored is not None:
                    pred = stored.pred_masks.to(state.device)
                elif self._fast is not None and self.speed.batch_objects:
                    tracked.append((len(per_obj), obj))
                    pred = None
                else:
                    out = self._run(state, obj, frame_idx, False, reverse=reverse, run_mem_encoder=True)
                    obj.non_cond[frame_idx] = out
                    pred = out.pred_masks
                obj.frames_tracked[frame_idx] = reverse
                per_obj.append(pred)
            if tracked:
                features = self._features(state, frame_idx)
                outs = self._fast.track_objects(frame_idx, features, [(o.cond, o.non_cond) for _, o in tracked],
                                                state.num_frames, reverse, cache=state.key_cache)
                for (i, obj), out in zip(tracked, outs):
                    obj.non_cond[frame_idx] = out
                    per_obj[i] = out.pred_masks
            if state.key_cache is not None:
                state.key_cache.end_frame()
            yield frame_idx, state.obj_ids, self._video_res(state, torch.cat(per_obj, dim=0))

    # ---------------------------------------------------------------------------------- internals
    def _check_frame(self, state: InferenceState, frame_idx) -> int:
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)):
            raise ValueError(f"frame_idx must be an integer, got {frame_idx!r}")
        if not 0 <= frame_idx < state.num_frames:
            raise ValueError(f"frame_idx {frame_idx} is outside the video (frames 0..{state.num_frames - 1})")
        return int(frame_idx)

    def _features(self, state: InferenceState, frame_idx: int) -> Sam2Features:
        """Encoder outputs of a frame; only the most recently used frame is cached."""
        if state.cached_frame != frame_idx:
            image = state.frames.get(frame_idx).to(self.device)
            state.cached_frame, state.cached_features = None, None  # not needed while encoding
            if self._fast is not None:
                state.cached_features = self._fast.encode(image)
            else:
                state.cached_features = self.model.encode_image(image)
            state.cached_frame = frame_idx
        return state.cached_features

    def _run(self, state: InferenceState, obj: _ObjectState, frame_idx: int, is_init: bool, *,
             point_coords=None, point_labels=None, mask_inputs=None, reverse: bool, run_mem_encoder: bool,
             prev_mask_logits=None) -> FrameOutput:
        features = self._features(state, frame_idx)
        condition = None if self._fast is None else self._fast.condition(state.key_cache)
        out, _ = track_step(self.model, frame_idx, is_init, features, obj.cond, obj.non_cond, state.num_frames,
                            point_coords=point_coords, point_labels=point_labels, mask_inputs=mask_inputs,
                            reverse=reverse, run_mem_encoder=run_mem_encoder, prev_mask_logits=prev_mask_logits,
                            condition=condition)
        return out

    def _consolidated(self, state: InferenceState, frame_idx: int, is_cond: bool) -> torch.Tensor:
        """Every object's output on a frame (temporary ones of this call's kind first), at video size."""
        h, w = state.video_height, state.video_width
        masks = torch.full((len(state.objects), 1, h, w), NO_OBJ_SCORE, dtype=torch.float32, device=state.device)
        for i, obj in enumerate(state.objects.values()):
            out = obj.temp(is_cond).get(frame_idx)
            if out is None:
                out = obj.cond.get(frame_idx)
            if out is None:
                out = obj.non_cond.get(frame_idx)
            if out is None:
                continue
            masks[i : i + 1] = F.interpolate(out.pred_masks.to(state.device).float(), size=(h, w),
                                             mode="bilinear", align_corners=False)
        return self._apply_non_overlap(masks)

    def _video_res(self, state: InferenceState, low_res: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(low_res.float(), size=(state.video_height, state.video_width), mode="bilinear",
                              align_corners=False)
        return self._apply_non_overlap(masks)

    def _apply_non_overlap(self, masks: torch.Tensor) -> torch.Tensor:
        """With ``non_overlap_masks``, each pixel keeps only its highest-scoring object (others <= -10)."""
        if not self.non_overlap_masks or masks.shape[0] == 1:
            return masks
        best = torch.argmax(masks, dim=0, keepdim=True)
        keep = best == torch.arange(masks.shape[0], device=masks.device)[:, None, None, None]
        return torch.where(keep, masks, torch.clamp(masks, max=-10.0))
