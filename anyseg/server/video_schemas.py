"""Request and response bodies of the video API (``/api/v1/videos``), shown in the OpenAPI document.

Coordinates are pixels of the video frame: X to the right, Y down, origin at the top-left corner.
Frames are numbered from 0. Object ids are integers chosen by the client.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .schemas import MaskFormat

Direction = Literal["forward", "backward", "both"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VideoFileRequest(_Strict):
    path: str = Field(..., description="a video file (.mp4, .mov, .webm, .mkv, .avi, .m4v) or a folder of JPEG "
                                       "frames (00000.jpg, 00001.jpg, ...), relative to the served folder")


class VideoInfo(BaseModel):
    id: str = Field(..., description="the session id, used in every other video request")
    name: str = Field(..., description="the file or folder the video was opened from")
    num_frames: int
    width: int
    height: int
    obj_ids: List[int] = Field(default_factory=list, description="objects with prompts or results, in order")
    prompted_frames: Dict[str, List[int]] = Field(default_factory=dict,
                                                  description="object id -> frames with prompts of that object")
    frames_with_results: int = Field(0, description="how many frames hold masks (from prompts or tracking)")
    propagating: bool = Field(False, description="whether a propagation is running now")
    idle_timeout_s: float = Field(..., description="the session is closed after this long without requests")


class VideoList(BaseModel):
    sessions: List[VideoInfo]
    max_sessions: int
    idle_timeout_s: float


class VideoPromptRequest(_Strict):
    frame_idx: int = Field(..., description="the frame the prompt is on (0-based)")
    obj_id: int = Field(..., description="the object the prompt is for (new ids create an object)")
    points: Optional[List[List[float]]] = Field(None, description="clicks, N x [x, y] pixels of the frame")
    labels: Optional[List[int]] = Field(None, description="one per point: 1 = on the object, 0 = not on it")
    box: Optional[List[float]] = Field(None, description="[x0, y0, x1, y1] pixels of the frame, x0 < x1, y0 < y1")
    clear_old_points: bool = Field(True, description="replace this object's earlier clicks on this frame "
                                                     "(false adds to them; a box always replaces)")
    mask_png: Optional[str] = Field(None, description="the object's mask as a base64 PNG of exactly the frame's "
                                                      "size (non-zero = object); not combined with points or box")
    mask_rle: Optional[Dict[str, Any]] = Field(None, description="the object's mask as an RLE {'size': [H, W], "
                                                                 "'counts': COCO string or list of ints}")
    format: MaskFormat = Field("coco_rle", description="how the returned masks are encoded")


class ClearPromptsRequest(_Strict):
    frame_idx: int
    obj_id: int
    format: MaskFormat = "coco_rle"


class PropagateRequest(_Strict):
    direction: Direction = Field("forward", description="forward, backward, or both (forward, then backward from "
                                                        "the same start frame, which is not sent twice)")
    start_frame_idx: Optional[int] = Field(None, description="first frame; default: the earliest prompted frame "
                                                             "(forward, both) or the latest one (backward)")
    max_frames: Optional[int] = Field(None, ge=1, description="at most this many frames per direction, the start "
                                                              "frame included (default: to the end of the video)")
    format: MaskFormat = Field("coco_rle", description="how the streamed masks are encoded")


class ObjectMask(BaseModel):
    obj_id: int
    mask: Any = Field(..., description="the mask in the requested format (COCO RLE by default)")
    area: int = Field(..., description="pixels in the mask (0: the object is not visible on this frame)")
    bbox: List[float] = Field(..., description="XYWH box of the mask (zeros when empty)")


class FrameMasks(BaseModel):
    id: str
    frame_idx: int
    obj_ids: List[int]
    format: MaskFormat
    masks: List[ObjectMask] = Field(..., description="one per object of obj_ids, in that order")
    tracked: bool = Field(True, description="false when the frame holds no result yet")


class RemoveObjectResponse(BaseModel):
    id: str
    obj_ids: List[int] = Field(..., description="the objects left")
    updated_frames: List[FrameMasks] = Field(..., description="the frames the object had prompts on, re-read")


class DeleteVideoResponse(BaseModel):
    id: str
    deleted: bool
    released: bool = Field(..., description="whether the frames and spilled outputs were released before the "
                                            "answer (otherwise: when the frame being tracked finishes)")
    stopped_propagation: bool = Field(False, description="whether a running propagation was stopped")


class CancelResponse(BaseModel):
    id: str
    cancelled: bool = Field(..., description="whether a propagation was running and was told to stop")
