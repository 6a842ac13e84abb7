"""SAM 2 wiring (spec/sam2.md sections 3, 4 and 8.1): image encoder, prompt encoder, mask decoder,
memory modules and the object-pointer heads. Only :func:`build_sam2_model` knows how the parts are
built. Attribute names are the public checkpoint's key prefixes.

Model frame: the ``S x S`` square (S = 1024) the image is squashed to, without keeping the aspect
ratio; prompts given to the methods here are XY in that frame.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config_sam2 import Sam2Config
from ..common import MLP
from ..prompt_encoder import PromptEncoder
from ...config import PromptEncoderConfig
from .decoder import Sam2MaskDecoder
from .hiera import Hiera
from .memory_attention import MemoryAttention
from .memory_encoder import MemoryEncoder
from .neck import FpnNeck, Sam2ImageEncoder, vision_position_encoding

#: Logit given to every pixel of an object judged absent (``object_score <= 0``).
NO_OBJ_SCORE = -1024.0


class Sam2Features(NamedTuple):
    """One encoded image batch, what the decoder and the memory need.

    vision: raw stride-16 feature ``B x 256 x 64 x 64`` (no ``no_mem_embed``; the memory encoder's input).
    vision_pos: its sine position encoding ``1 x 256 x 64 x 64``.
    high_res: ``(B x 32 x 256 x 256, B x 64 x 128 x 128)`` after ``conv_s0`` / ``conv_s1``.
    """

    vision: torch.Tensor
    vision_pos: torch.Tensor
    high_res: Tuple[torch.Tensor, ...]

    def select(self, index: int) -> "Sam2Features":
        """The features of image ``index`` of the batch (``1 x ...``)."""
        return Sam2Features(self.vision[index : index + 1], self.vision_pos,
                            tuple(f[index : index + 1] for f in self.high_res))


class HeadsOutput(NamedTuple):
    """Result of one decoder pass as the tracker uses it (reference ``_forward_sam_heads``).

    low_res_multimasks ``B x k x 256 x 256`` and high_res_multimasks ``B x k x S x S`` (absent objects at
    -1024), ious ``B x k``, the chosen ``low_res_masks`` / ``high_res_masks`` ``B x 1 x ...``, obj_ptr
    ``B x 256``, object_score ``B x 1``.
    """

    low_res_multimasks: torch.Tensor
    high_res_multimasks: torch.Tensor
    ious: torch.Tensor
    low_res_masks: torch.Tensor
    high_res_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor


class Sam2(nn.Module):
    """The SAM 2 / 2.1 model (images and the building blocks of video tracking)."""

    image_format = "RGB"

    def __init__(self, *, config: Sam2Config, image_encoder: Sam2ImageEncoder, prompt_encoder: PromptEncoder,
                 mask_decoder: Sam2MaskDecoder, memory_attention: MemoryAttention,
                 memory_encoder: MemoryEncoder) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        dim, mem_dim = config.transformer_dim, config.mem_dim
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, dim))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, dim))
        if config.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, mem_dim))
        # Mask prompt (1024^2) -> the prompt encoder's 256^2 mask input, for pointers of mask prompts.
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        if config.use_mlp_for_obj_ptr_proj:
            self.obj_ptr_proj = MLP(dim, dim, dim, 3)
        else:
            self.obj_ptr_proj = nn.Linear(dim, dim)
        if config.add_tpos_enc_to_obj_ptrs and config.proj_tpos_enc_in_obj_ptrs:
            self.obj_ptr_tpos_proj = nn.Linear(dim, mem_dim)
        else:
            self.obj_ptr_tpos_proj = nn.Identity()
        self.mask_threshold = config.mask_threshold
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.config.image_size

    @property
    def family(self) -> str:
        return "sam2"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` RGB in [0, 1] -> normalised model input."""
        return (x - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------------------------ images
    def encode_image(self, x: torch.Tensor) -> Sam2Features:
        """Normalised ``B x 3 x S x S`` -> :class:`Sam2Features`."""
        levels = list(self.image_encoder(x).levels)
        if self.config.use_high_res_features_in_sam:
            levels[0] = self.sam_mask_decoder.conv_s0(levels[0])
            levels[1] = self.sam_mask_decoder.conv_s1(levels[1])
        vision = levels[-1]
        h, w = vision.shape[-2:]
        pos = vision_position_encoding(h, w, vision.shape[1], device=vision.device, dtype=vision.dtype)
        return Sam2Features(vision, pos, tuple(levels[:-1]))

    def image_embedding(self, features: Sam2Features) -> torch.Tensor:
        """The decoder's image embedding for a single image (no memory): ``vision + no_mem_embed``."""
        if self.config.directly_add_no_mem_embed:
            return features.vision + self.no_mem_embed.reshape(1, -1, 1, 1)
        return features.vision

    def embed_prompts(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Model-frame points (``B x N x 2``, labels ``B x N`` in -1..3; box corners are points labelled
        2 and 3) and ``B x 1 x 256 x 256`` mask logits -> sparse ``B x T x 256`` and dense embeddings.
        SAM 2 never passes boxes to the prompt encoder, so a pad point follows any points."""
        return self.sam_prompt_encoder(points, None, masks)

    def decode(self, image_embedding: torch.Tensor, high_res: Tuple[torch.Tensor, ...], sparse: torch.Tensor,
               dense: torch.Tensor, multimask_output: bool):
        """Low-res logits ``B x k x 256 x 256``, IoU ``B x k``, tokens, object score (``DecoderOutput``)."""
        return self.sam_mask_decoder(image_embedding, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                     multimask_output, high_res_features=high_res)

    # ------------------------------------------------------------------------------- tracking heads
    def sam_heads(self, backbone_features: torch.Tensor, point_coords: Optional[torch.Tensor] = None,
                  point_labels: Optional[torch.Tensor] = None, mask_inputs: Optional[torch.Tensor] = None,
                  high_res_features: Optional[Tuple[torch.Tensor, ...]] = None,
                  multimask_output: bool = False) -> HeadsOutput:
        """One decoder pass with object-presence gating and the object pointer (spec 8.1 steps 3-4).

        ``backbone_features`` ``B x 256 x 64 x 64`` (memory-conditioned, or ``vision + no_mem_embed``);
        points in the model frame, or none: then one pad point per object (two pad tokens in all).
        ``mask_inputs`` ``B x 1 x h x w`` logits, resized (bilinear, antialiased) to 256^2 if needed.
        """
        b = backbone_features.shape[0]
        device = backbone_features.device
        if point_coords is None:
            point_coords = torch.zeros(b, 1, 2, device=device)
            point_labels = -torch.ones(b, 1, dtype=torch.int32, device=device)
        mask_prompt = None
        if mask_inputs is not None:
            size = self.sam_prompt_encoder.mask_input_size
            if tuple(mask_inputs.shape[-2:]) != tuple(size):
                mask_prompt = F.interpolate(mask_inputs.float(), size=size, mode="bilinear", align_corners=False,
                                            antialias=True)
            else:
                mask_prompt = mask_inputs
        sparse, dense = self.embed_prompts((point_coords, point_labels), mask_prompt)
        out = self.decode(backbone_features, high_res_features, sparse, dense, multimask_output)
        low_res_multi, ious, tokens, object_score = out
        present = object_score > 0
        if self.config.pred_obj_scores:
            low_res_multi = torch.where(present[:, None, None], low_res_multi, NO_OBJ_SCORE)
        low_res_multi = low_res_multi.float()
        s = self.img_size
        high_res_multi = F.interpolate(low_res_multi, size=(s, s), mode="bilinear", align_corners=False)
        token = tokens[:, 0]
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(b, device=device)
            low_res = low_res_multi[rows, best].unsqueeze(1)
            high_res = high_res_multi[rows, best].unsqueeze(1)
            if tokens.shape[1] > 1:
                token = tokens[rows, best]
        else:
            low_res, high_res = low_res_multi, high_res_multi
        obj_ptr = self.obj_ptr_proj(token)
        if self.config.pred_obj_scores:
            obj_ptr = self.gate_pointer(obj_ptr, object_score.sigmoid() if self.config.soft_no_obj_ptr
                                        else present.float())
        return HeadsOutput(low_res_multi, high_res_multi, ious, low_res, high_res, obj_ptr, object_score)

    def gate_pointer(self, obj_ptr: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Absent objects get ``no_obj_ptr`` (with ``fixed_no_obj_ptr`` instead of their own pointer)."""
        if self.config.fixed_no_obj_ptr:
            obj_ptr = presence * obj_ptr
        return obj_ptr + (1 - presence) * self.no_obj_ptr

    def mask_as_output(self, backbone_features: torch.Tensor, high_res_features: Tuple[torch.Tensor, ...],
                       mask_inputs: torch.Tensor) -> HeadsOutput:
        """A mask prompt taken as the output (spec 8.1 step 1): ``B x 1 x S x S`` binary mask in."""
        scale, bias = 20.0, -10.0
        mask = mask_inputs.float()
        high_res = mask * scale + bias
        low_res = F.interpolate(high_res, size=(high_res.shape[-2] // 4, high_res.shape[-1] // 4),
                                mode="bilinear", align_corners=False, antialias=True)
        ious = mask.new_ones(mask.shape[0], 1)
        if self.config.use_obj_ptrs_in_encoder:
            obj_ptr = self.sam_heads(backbone_features, mask_inputs=self.mask_downsample(mask),
                                     high_res_features=high_res_features).obj_ptr
        else:
            obj_ptr = torch.zeros(mask.shape[0], self.config.transformer_dim, device=mask.device)
        present = torch.any(mask.flatten(1) > 0.0, dim=1)[..., None].float()
        object_score = scale * present + bias
        if self.config.pred_obj_scores:
            obj_ptr = self.gate_pointer(obj_ptr, present)
        return HeadsOutput(low_res, high_res, ious, low_res, high_res, obj_ptr, object_score)


def build_sam2_model(config: Sam2Config) -> Sam2:
    """Build an (untrained) SAM 2 model from a config."""
    trunk = Hiera(config.trunk)
    neck = FpnNeck(config.neck)
    encoder = Sam2ImageEncoder(trunk, neck, config.neck.scalp)
    prompt = PromptEncoder(PromptEncoderConfig(embed_dim=config.transformer_dim, mask_in_chans=config.mask_in_chans),
                           img_size=config.image_size, embedding_size=config.embedding_size)
    decoder = Sam2MaskDecoder(config)
    return Sam2(config=config, image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                # The reference computes these attentions with fused SDPA in float32; the explicit
                # softmax (use_sdpa=False) gives the same numbers to float32 rounding, several times slower.
                memory_attention=MemoryAttention(config.memory_attention, use_sdpa=True),
                memory_encoder=MemoryEncoder(config.memory_encoder))
