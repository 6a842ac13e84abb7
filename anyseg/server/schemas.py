"""Request and response bodies of the HTTP API (pydantic models, shown in the OpenAPI document).

Coordinates are pixels of the original image: X to the right, Y down, origin at the top-left corner.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

MaskFormat = Literal["coco_rle", "rle", "png", "polygons"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="what was wrong with the request")
    errors: Optional[List[Dict[str, Any]]] = Field(
        None, description="on an invalid request: each problem, with its location ('loc') and message ('msg')")


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    device: str
    cache: Dict[str, int] = Field(..., description="entries, bytes, max_bytes, hits, misses, evictions")
    encodes: int = Field(..., description="images encoded since start")
    decoder: str = Field(..., description="browser decoder status: exporting, ready or unavailable")
    annotations_file: Optional[str] = None
    images_dir: bool = Field(..., description="whether a folder of images is served")
    auth: bool = Field(..., description="whether requests need a bearer token")


class ModelInfo(BaseModel):
    name: str
    loaded: bool = Field(..., description="whether this is the model the server runs now")
    family: Optional[str] = Field(None, description="model family: sam (SAM 1, MobileSAM) or sam2 (SAM 2 / 2.1); "
                                  "known for the loaded model")
    encoder: Optional[str] = None
    img_size: Optional[int] = None
    embedding_shape: Optional[List[int]] = None
    mask_threshold: Optional[float] = None


class ModelSwitchRequest(_Strict):
    name: str = Field(..., min_length=1, max_length=1000,
                      description="a model listed by GET /api/v1/models (the served model or a checkpoint file "
                                  "of --models, by its path relative to that folder)")


class DecoderInfo(BaseModel):
    status: Literal["exporting", "ready", "unavailable"]
    reason: str = ""
    url: Optional[str] = Field(None, description="where to fetch the ONNX decoder graph when ready")
    cache_url: Optional[str] = Field(None, description="where to fetch the per-image ONNX graph when ready: run "
                                     "once per image on its embedding, its outputs are the decoder graph's image "
                                     "inputs")
    nomask_url: Optional[str] = Field(None, description="where to fetch the decoder graph for prompts without a "
                                      "mask prompt (a first click) when ready, inputs in nomask_inputs: with the "
                                      "exact setting the decoder graph's inputs less mask_input and has_mask_input; "
                                      "with the approximate setting the low-rank graph, which also takes "
                                      "upscale_grid, an R x C tensor whose shape says which image tokens to "
                                      "upscale (low_res_masks then 1 x 3 x 4R x 4C)")
    runtime_url: Optional[str] = Field(None, description="onnxruntime-web module served for the page, if installed")
    opset: int
    cache_inputs: Dict[str, str] = Field(default_factory=dict, description="per-image graph input names and shapes")
    inputs: Dict[str, str] = Field(default_factory=dict, description="decoder graph input names and shapes")
    nomask_inputs: Dict[str, str] = Field(default_factory=dict,
                                          description="input names and shapes of the graph at nomask_url")
    outputs: Dict[str, str] = Field(default_factory=dict, description="graph output names and shapes")
    img_size: int = Field(..., description="the model's input size: long side of the model frame")
    mask_side: int = Field(..., description="side of the low-res logits (and of mask_input)")
    graph: Literal["approximate", "exact"] = Field(
        "approximate", description="which decoder graph the page gets (anyseg serve --page-graph): approximate "
        "(the three candidates only, int8 upscaling products, a low-rank first-click graph; masks within IoU 0.98 "
        "of the server's) or exact (float32)")


class ImageInfo(BaseModel):
    id: str = Field(..., description="SHA-256 of the image file's bytes; use it in later requests")
    name: str = ""
    width: int
    height: int
    input_width: int = Field(..., description="width in the model frame (SAM 1: long side = img_size; SAM 2: "
                             "img_size, the image is squashed to the square)")
    input_height: int
    embedding_shape: List[int]
    cached: bool = Field(..., description="true when the embedding came from the cache")
    embedding: Optional[str] = Field(None, description="base64 little-endian float32 embedding, if asked for")


class FileEncodeRequest(_Strict):
    path: str = Field(..., description="image path relative to the served folder", max_length=4096)
    include_embedding: bool = False


class FileList(BaseModel):
    files: List[str] = Field(..., description="image paths relative to the served folder (POSIX separators)")


class DecodeRequest(_Strict):
    points: Optional[List[List[float]]] = Field(None, description="N x 2 XY points", examples=[[[400, 267]]])
    labels: Optional[List[int]] = Field(None, description="N labels: 1 foreground, 0 background", examples=[[1]])
    box: Optional[List[float]] = Field(None, description="XYXY box: x0, y0, x1, y1", min_length=4, max_length=4)
    mask_input: Optional[str] = Field(
        None, description="base64 float32 1 x 256 x 256 low-res logits of a previous prediction (refinement)")
    multimask: bool = Field(True, description="return three candidates (whole, part, sub-part) instead of one")
    hq_token_only: bool = Field(False, description="HQ-SAM models only: the HQ token's mask alone instead of "
                                                   "the best SAM mask plus it (HQ-SAM returns one mask)")
    format: MaskFormat = "coco_rle"
    polygon_tolerance: float = Field(0.0, ge=0.0, le=100.0, description="simplification for format=polygons")
    return_logits: bool = Field(True, description="include the low-res logits (for refinement)")


class DecodedMask(BaseModel):
    score: float = Field(..., description="predicted IoU")
    area: int
    bbox: List[float] = Field(..., description="XYWH")
    mask: Any = Field(..., description="the mask in the requested format")


class DecodeResponse(BaseModel):
    id: str
    width: int
    height: int
    format: MaskFormat
    masks: List[DecodedMask] = Field(..., description="best first")
    low_res_logits: Optional[str] = Field(None, description="base64 float32 k x 256 x 256, in the order of masks")
    low_res_shape: List[int]
    decode_ms: float
    model: str = Field("", description="name of the model that decoded these masks")


class EverythingRequest(_Strict):
    points_per_side: int = Field(16, ge=1, le=64)
    points_per_batch: int = Field(64, ge=1, le=1024)
    pred_iou_thresh: float = Field(0.88, ge=-1e9, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=-1e9, le=1.0)
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    min_mask_region_area: int = Field(0, ge=0)
    format: MaskFormat = "coco_rle"
    polygon_tolerance: float = Field(0.0, ge=0.0, le=100.0)


class EverythingMask(BaseModel):
    area: int
    bbox: List[float]
    predicted_iou: float
    stability_score: float
    point_coords: List[List[float]]
    mask: Any


class EverythingResponse(BaseModel):
    id: str
    width: int
    height: int
    format: MaskFormat
    masks: List[EverythingMask]
    elapsed_ms: float


class _ProposalOptions(_Strict):
    """What a request for proposals (auto-label, concept prompt) shares: which to hide, how to encode."""
    min_area: int = Field(0, ge=0, description="drop proposals smaller than this many pixels")
    overlap_thresh: float = Field(0.5, ge=0.0, le=1.0, description="hide proposals whose area is covered by the "
                                  "image's accepted objects at least this much (fraction of the proposal)")
    format: MaskFormat = "coco_rle"
    polygon_tolerance: float = Field(0.0, ge=0.0, le=100.0)


class AutoLabelRequest(_ProposalOptions):
    points_per_side: int = Field(16, ge=1, le=64, description="grid of point prompts per image side")
    points_per_batch: int = Field(64, ge=1, le=1024)
    pred_iou_thresh: float = Field(0.9, ge=0.0, le=1.0, description="keep masks whose predicted IoU is above this "
                                   "(confident: higher than segment everything's default)")
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0, description="keep masks at least this stable")
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)


class Proposal(BaseModel):
    area: int
    bbox: List[float] = Field(..., description="XYWH")
    predicted_iou: float
    stability_score: float
    point: List[float] = Field(..., description="the XY grid point that produced it")
    mask: Any


class AutoLabelResponse(BaseModel):
    id: str
    width: int
    height: int
    format: MaskFormat
    model: str = Field(..., description="the model that proposed them (record it when accepting one)")
    proposals: List[Proposal] = Field(..., description="confident masks not yet accepted, most confident first")
    hidden: int = Field(..., description="proposals left out because accepted objects already cover them")
    elapsed_ms: float


class ProvenanceIn(_Strict):
    stage: Literal["manual", "assisted", "auto"] = Field(
        "manual", description="manual: drawn or given without the model; assisted: clicks decoded by the model; "
                              "auto: an accepted auto-label proposal")
    model: Optional[str] = Field(None, max_length=300, description="the model that made the mask (default for "
                                 "assisted / auto: the model the server runs now)")
    clicks: int = Field(0, ge=0, le=100_000, description="prompt clicks (and boxes) spent on the object")
    seconds: Optional[float] = Field(None, ge=0.0, le=86_400.0, description="seconds spent on the object")


class Provenance(BaseModel):
    stage: str
    model: Optional[str] = None
    clicks: int = 0
    seconds: Optional[float] = None
    created: Optional[str] = None


class StageStats(BaseModel):
    objects: int
    share: float = Field(..., description="fraction of all objects")
    seconds_per_mask: Optional[float] = None
    clicks_per_mask: Optional[float] = None


class Stats(BaseModel):
    images: int = Field(..., description="images with at least one object")
    objects: int
    masks_per_image: float
    seconds_per_mask: Optional[float] = Field(None, description="mean over the objects that recorded their time")
    clicks_per_mask: Optional[float] = None
    stages: Dict[str, StageStats] = Field(..., description="manual, assisted, auto (and unknown: objects saved "
                                          "without provenance, if any)")
    models: Dict[str, int] = Field(..., description="objects per model that made them")


class AnnotationCreate(_Strict):
    image_id: str = Field(..., description="id of an encoded image", min_length=1, max_length=128)
    label: str = Field(..., min_length=1, max_length=100)
    segmentation: Any = Field(..., description="uncompressed RLE, COCO RLE, or a list of polygons, original frame")
    score: Optional[float] = None
    file_name: Optional[str] = Field(None, max_length=4096, description="defaults to the image's name")
    provenance: Optional[ProvenanceIn] = Field(None, description="how the object was made (default: manual)")


class AnnotationUpdate(_Strict):
    label: str = Field(..., min_length=1, max_length=100)


class Annotation(BaseModel):
    id: int
    image_id: int
    anyseg_id: str
    category_id: int
    label: str
    segmentation: Dict[str, Any]
    area: int
    bbox: List[float]
    iscrowd: int
    score: Optional[float] = None
    provenance: Optional[Provenance] = None


class AnnotationList(BaseModel):
    annotations: List[Annotation]
    persistent: bool = Field(..., description="whether changes are written to an annotations file")


# ------------------------------------------------------------------------------ concept prompts (SAM 3)
class ExemplarBox(_Strict):
    xyxy: List[float] = Field(..., min_length=4, max_length=4, description="X0, Y0, X1, Y1 in image pixels")
    positive: bool = Field(True, description="true: things like this; false: not like this")


class ConceptRequest(_ProposalOptions):
    text: Optional[str] = Field(None, max_length=500, description="one phrase, or several separated by '.' "
                                "(each is its own concept); with only boxes, leave it out")
    boxes: List[ExemplarBox] = Field([], max_length=32, description="exemplar boxes (applied with every phrase)")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="keep instances whose score exceeds this")


class ConceptInstance(BaseModel):
    phrase: str = Field(..., description="the phrase that found it ('exemplar' for boxes alone)")
    score: float = Field(..., description="the instance's probability (query score x presence)")
    box: List[float] = Field(..., description="the predicted box, XYXY pixels (not clipped)")
    area: int
    bbox: List[float] = Field(..., description="XYWH box of the mask")
    mask: Any


class ConceptResponse(BaseModel):
    id: str
    width: int
    height: int
    format: MaskFormat
    model: str = Field(..., description="the SAM 3 model that found them (record it when accepting one)")
    presence: Dict[str, float] = Field(..., description="per phrase: the probability that it is in the image")
    instances: List[ConceptInstance] = Field(..., description="instances not yet accepted, highest score first")
    hidden: int = Field(..., description="instances left out because accepted objects already cover them")
    elapsed_ms: float
