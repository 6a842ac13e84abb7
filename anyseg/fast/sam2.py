"""Fast paths for SAM 2 images, over the faithful modules of :mod:`anyseg.modeling.sam2`.

They read the model's own parameters (nothing is copied or re-keyed) and are switched on with
:mod:`anyseg.speed` (``SAM2ImagePredictor`` picks them up). In float32 they compute the faithful
function with the arithmetic reordered, so results match it to rounding and stay within the golden
tolerances; reduced precision (bfloat16 on CPUs with native bfloat16, float16 on GPUs) is a separate
switch held to the quality bar of ``docs/speed.md``.

**Encoder** (:func:`encode`):

* Hiera's attention through ``scaled_dot_product_attention`` (the modules' ``fused`` flag), and on a
  CPU the trunk's linear layers through oneDNN with packed weights and the MLPs' GELU fused in
  (:func:`anyseg.speed.onednn_encoder`).
* The position embedding (a bicubic resize of the background table plus the tiled window table)
  depends only on the weights and the grid: it is made once and kept until a weight changes.
* The patch embedding's convolution writes channels-last, so the trunk's token layout is a view.
* The neck and the decoder's high-resolution projections are 1 x 1 convolutions, i.e. per-token linear
  maps, and levels 0 and 1 have no top-down term: ``conv_s0(lateral(x))`` is one ``D -> 32`` map and
  ``conv_s1(lateral(x))`` one ``2D -> 64`` map (weights multiplied once per weight change), applied to
  the channels-last stage outputs. The 256-channel stride-4 and stride-8 maps are never formed.

**Decoder** (:class:`Sam2FastDecoder`): :class:`anyseg.fast.FastDecoder` (per-image cache of the
prompt-independent work, few-token attention without projecting the image, low-rank upscaling,
oneDNN products) with SAM 2's differences:

* The object-score token joins the prompt tokens. The two-way transformer treats its tokens as a set
  (every token attends to all of them; positions enter only through each token's own initial value),
  so the token order changes nothing but the order of sums. The image predictor does not read the
  object score, so its final attention is skipped.
* The high-resolution features are added inside the upscaling: per image they are laid out like the
  upscaling's matrix products (``N x (2 x 2 x C/4)`` and ``4N x (2 x 2 x C/8)`` rows) with the
  transposed convolutions' biases folded in; for one prompt the second product adds them in oneDNN's
  epilogue and the GELU runs in place.
* The dynamic multimask fallback decodes all four masks from one upscaling and picks as the model does.

**Post-processing**: the bilinear resize of the 256 x 256 logits straight to the image size as one
banded row and column resampling (:meth:`anyseg.fast.resize.MaskResizer.direct`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .decoder import FastDecoder, _kept, _pixel_shuffle

__all__ = ["Sam2FastDecoder", "Sam2FastEncoder", "encode", "fast_encoder"]


# ------------------------------------------------------------------------------------------- encoder
def _stamp(params: Sequence[torch.Tensor]) -> tuple:
    return tuple((id(p), p.data_ptr(), onednn.version(p), tuple(p.shape)) for p in params)


class Sam2FastEncoder(nn.Module):
    """SAM 2's image encoder plus the decoder's high-resolution projections, computed as described in
    the module docstring. Holds the model's modules (shared, not copied): ``trunk`` may be a copy of the
    module tree that shares the parameters (oneDNN linear layers, float32 islands).

    ``forward(x)`` takes the normalised ``B x 3 x S x S`` input and returns ``(vision, (s0, s1))``:
    the stride-16 feature ``B x 256 x h x w`` and the projected high-resolution maps, channels first
    (views of channels-last tensors), in float32.
    """

    def __init__(self, model: nn.Module, trunk: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None,
                 cast: bool = False) -> None:
        super().__init__()
        encoder = model.image_encoder
        self.trunk = trunk if trunk is not None else encoder.trunk
        self.dtype = dtype  # the trunk's reduced precision (autocast, or its weights cast with ``cast``)
        self.cast = bool(cast and dtype is not None)
        self.neck = encoder.neck
        self.scalp = encoder.scalp
        dec = model.sam_mask_decoder
        self.high_res = bool(model.config.use_high_res_features_in_sam)
        self.conv_s0 = dec.conv_s0 if self.high_res else None
        self.conv_s1 = dec.conv_s1 if self.high_res else None
        self._kept: Dict[object, tuple] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_kept"] = {}
        return state

    def _keep(self, key, params: Sequence[torch.Tensor], make):
        stamp = _stamp(params)
        hit = self._kept.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, make())
            self._kept[key] = hit
        return hit[1]

    def position_embedding(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """The trunk's position embedding for an ``h x w`` grid (``1 x h x w x D``), kept."""
        trunk = self.trunk
        return self._keep(("pos", h, w, dtype), [trunk.pos_embed, trunk.pos_embed_window],
                          lambda: trunk.position_embedding(h, w).to(dtype).contiguous())

    def _linear_of_convs(self, first: nn.Conv2d, second: Optional[nn.Conv2d]) -> Tuple[torch.Tensor, torch.Tensor]:
        """1 x 1 convolutions ``second(first(x))`` as one map: ``(W^T (C_in x C_out), b)``."""
        def make():
            w = first.weight.flatten(1).float()  # C_mid x C_in
            b = first.bias.float()
            if second is not None:
                w2 = second.weight.flatten(1).float()  # C_out x C_mid
                w, b = w2 @ w, w2 @ b + second.bias.float()
            return w.t().contiguous(), b.contiguous()
        params = [first.weight, first.bias] + ([] if second is None else [second.weight, second.bias])
        return self._keep(("conv", id(first), id(second)), params, make)

    def _project(self, x: torch.Tensor, first: nn.Conv2d, second: Optional[nn.Conv2d] = None) -> torch.Tensor:
        """Channels-last ``B x h x w x C_in`` through 1 x 1 convolutions -> ``B x h x w x C_out`` float32."""
        wt, b = self._linear_of_convs(first, second)
        lead = x.shape[:-1]
        out = torch.addmm(b, x.reshape(-1, x.shape[-1]).float(), wt)
        return out.view(*lead, -1)

    def trunk_levels(self, x: torch.Tensor):
        """Patch embedding, position embedding and the blocks: the stage outputs, channels-last."""
        trunk = self.trunk
        conv = trunk.patch_embed.proj
        x = conv(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        x = x + self.position_embedding(x.shape[1], x.shape[2], x.dtype)
        outputs = []
        ends = set(trunk.stage_ends)
        for i, block in enumerate(trunk.blocks):
            x = block(x)
            if i in ends:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        device = x.device.type
        if self.cast:
            stages = self.trunk_levels(x.to(self.dtype))
        elif self.dtype is not None:
            with torch.autocast(device, dtype=self.dtype):
                stages = self.trunk_levels(x)
        else:
            with torch.autocast(device, enabled=False):
                stages = self.trunk_levels(x)
        with torch.autocast(device, enabled=False):  # the neck and projections in float32
            return self.neck_levels(stages)

    def neck_levels(self, stages: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """Channels-last stage outputs -> ``(vision, high-res maps)`` as :meth:`forward` returns them."""
        neck = self.neck
        n = len(neck.convs) - 1
        kept = len(stages) - self.scalp  # levels 0 .. kept - 1 are used
        top_down = set(neck.config.fpn_top_down_levels)
        # Levels whose only use is a projection by conv_s0 / conv_s1: composed with their lateral.
        composed = {0: self.conv_s0, 1: self.conv_s1} if self.high_res else {}
        levels: Dict[int, Optional[torch.Tensor]] = {}
        prev = None
        for i in range(n, -1, -1):
            conv = neck.convs[n - i].conv
            if i in top_down and prev is not None:
                b, h, w, c = prev.shape
                up = prev.view(b, h, 1, w, 1, c).expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)
                cur = self._project(stages[i], conv).add_(up)  # nearest x2, as the neck (in float32)
            elif i in composed and i - 1 not in top_down:
                cur = None  # the lateral alone: formed composed with its projection below
            else:
                cur = self._project(stages[i], conv)
            levels[i] = cur
            prev = cur
        high = []
        for i in range(kept - 1):
            if i in composed:
                out = (self._project(stages[i], neck.convs[n - i].conv, composed[i]) if levels[i] is None
                       else self._project(levels[i], composed[i]))
            else:
                out = levels[i]
            high.append(out.permute(0, 3, 1, 2))
        return levels[kept - 1].permute(0, 3, 1, 2), tuple(high)


def fast_encoder(model: nn.Module, encoder: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None,
                 cast: bool = False) -> Sam2FastEncoder:
    """A :class:`Sam2FastEncoder` for ``model`` whose trunk is ``encoder.trunk`` (default: the model's own
    image encoder; :func:`anyseg.speed.apply` passes its oneDNN / cast / quantised copy)."""
    encoder = model.image_encoder if encoder is None else encoder
    return Sam2FastEncoder(model, trunk=encoder.trunk, dtype=dtype, cast=cast)


def encode(model: nn.Module, x: torch.Tensor):
    """Normalised ``B x 3 x S x S`` images -> :class:`anyseg.modeling.sam2.Sam2Features`, through the
    fast encoder :func:`anyseg.speed.apply` keeps for ``model`` (the faithful ``encode_image`` when
    there is none). Features come out float32."""
    from ..modeling.sam2 import Sam2Features
    from ..modeling.sam2.neck import vision_position_encoding
    from ..speed import ieee_float32

    runtime = getattr(model, "speed_runtime", None)
    if runtime is None:
        return model.encode_image(x)
    with ieee_float32(x.device):
        vision, high = runtime.encoder(x)
    h, w = vision.shape[-2:]
    pos = vision_position_encoding(h, w, vision.shape[1], device=vision.device, dtype=vision.dtype)
    return Sam2Features(vision, pos, tuple(high))


# ------------------------------------------------------------------------------------------- decoder
class Sam2FastDecoder(FastDecoder):
    """:class:`anyseg.fast.FastDecoder` for a :class:`~anyseg.modeling.sam2.decoder.Sam2MaskDecoder`
    (see the module docstring). Per image: :meth:`set_image` with the image embedding
    (``vision + no_mem_embed``, ``1 x C x h x w``) and the projected high-resolution maps
    (``1 x C/8 x 4h x 4w``, ``1 x C/4 x 2h x 2w``, any memory layout)."""

    def __init__(self, decoder: nn.Module, image_pe: torch.Tensor, no_mask_embed: torch.Tensor,
                 upscale_chunk: int = 16, mask_projection: Optional[nn.Conv2d] = None) -> None:
        super().__init__(decoder, image_pe, no_mask_embed, upscale_chunk=upscale_chunk,
                         mask_projection=mask_projection)
        self.high_res: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._high_res_terms: Optional[tuple] = None

    def set_image(self, embedding: torch.Tensor, project: bool = True,
                  high_res: Optional[Sequence[torch.Tensor]] = None):
        cache = super().set_image(embedding, project)
        if self.decoder.use_high_res_features:
            if high_res is None:
                raise ValueError("this SAM 2 decoder needs the image's high-resolution features (high_res=...)")
            s0, s1 = high_res
            if s0.shape[0] != 1 or s1.shape[0] != 1:
                raise ValueError("Sam2FastDecoder.set_image takes the features of one image")
            self.high_res = (s0, s1)
        self._high_res_terms = None
        return cache

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The two-way blocks' token MLP (SAM 2 keeps it as ``layers.0 -> act -> layers.1``) through oneDNN
        with packed weights and the activation fused, where it can serve."""
        layers = getattr(mlp, "layers", None)
        name = onednn.activation_name(mlp.act)
        if layers is None or len(layers) != 2 or name is None or getattr(mlp, "sigmoid_output", False):
            return mlp(x) if layers is None or name is None else super()._mlp(mlp, x)
        key = ("mlp", id(mlp))
        if key not in self._weights:
            self._weights[key] = (onednn.PackedLinear(layers[0], name, rows=8), onednn.PackedLinear(layers[1], rows=8))
        first, second = self._weights[key]
        return second(first(x))

    def transformer(self, sparse: torch.Tensor, *args, **kwargs):
        """:meth:`FastDecoder.transformer` with the object-score token after the IoU and mask tokens (a
        reordering of a set: see the module docstring)."""
        dec = self.decoder
        if dec.pred_obj_scores:
            obj = dec.obj_score_token.weight.to(sparse.dtype).unsqueeze(0).expand(sparse.shape[0], -1, -1)
            sparse = torch.cat([obj, sparse], dim=1)
        return super().transformer(sparse, *args, **kwargs)

    def high_res_terms(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The high-resolution maps laid out as the upscaling's products, biases folded in:
        ``N x (2 2 C/4)`` (rows ``(i, j)``, columns ``(a, b, c)`` for pixel ``(2i + a, 2j + b)``) and
        ``4N x (2 2 C/8)`` (rows ``(i, j, a, b)``, columns ``(a2, b2, c)`` for pixel
        ``(4i + 2a + a2, 4j + 2b + b2)``). Once per image."""
        if self._high_res_terms is None:
            if self.high_res is None:
                raise ValueError("this SAM 2 decoder needs the image's high-resolution features "
                                 "(Sam2FastDecoder.set_image(..., high_res=...))")
            cache = self._require(None)
            h, w = cache.size
            up1, _, _, up2, _ = self.decoder.output_upscaling
            s0, s1 = self.high_res
            dtype = cache.keys.dtype
            c4, c8 = s1.shape[1], s0.shape[1]
            f1 = s1[0].permute(1, 2, 0).reshape(h, 2, w, 2, c4).permute(0, 2, 1, 3, 4).reshape(h * w, 4 * c4)
            f0 = s0[0].permute(1, 2, 0).reshape(h, 2, 2, w, 2, 2, c8).permute(0, 3, 1, 4, 2, 5, 6)
            f0 = f0.reshape(h * w * 4, 4 * c8)
            self._high_res_terms = ((f1 + up1.bias.repeat(4)).to(dtype).contiguous(),
                                    (f0 + up2.bias.repeat(4)).to(dtype).contiguous())
        return self._high_res_terms

    def upscale(self, hyper: torch.Tensor, image_tokens: torch.Tensor, low_rank) -> torch.Tensor:
        """SAM 2's upscaling, ``u = GELU(LN(convT1(K) + s1))``, ``GELU(convT2(u) + s0)``, and the
        hypernetworks' product: ``B x k x C/8`` and the ``B x N x C`` image tokens (and their
        :class:`~anyseg.fast.decoder.LowRankImage`, or None) -> ``B x k x 4h x 4w`` low-res logits."""
        dec = self.decoder
        if not dec.use_high_res_features:
            return super().upscale(hyper, image_tokens, low_rank)
        cache = self._require(None)
        h, w = cache.size
        b, k = hyper.shape[:2]
        up1, ln, act1, up2, act2 = dec.output_upscaling
        c, c4, c8 = up1.in_channels, up1.out_channels, up2.out_channels
        # ConvTranspose2d weight: in x out x 2 x 2 -> in x (a, b, out); biases are in the high-res terms.
        w1, w2 = _kept(self._weights, "sam2_upscale", [up1.weight, up2.weight], lambda: (
            up1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c4), up2.weight.permute(0, 2, 3, 1).reshape(c4, 4 * c8)))
        f1, f0 = self.high_res_terms()
        gelu = onednn.activation_name(act2) == "gelu"
        fused = gelu and onednn.usable(image_tokens, up2.weight, f0)
        if fused:
            w2_packed = _kept(self._weights, "sam2_upscale_packed", [up2.weight], lambda: onednn.pack(w2.t(), h * w * 4))
        terms = None if low_rank is None else low_rank.terms()
        base = None if terms is None else self._upscale_base(terms.gamma, w1)

        def upscale(sl: slice) -> torch.Tensor:
            hyp = hyper[sl]
            n = hyp.shape[0]
            if terms is None:
                x = torch.matmul(image_tokens[sl], w1).add_(f1)  # n x N x (a b c4)
            else:  # alpha * (K G W1) + Z (U W1) + b1 + s1
                x = torch.addcmul(f1, base, terms.alpha[sl].unsqueeze(-1))
                x = x.baddbmm_(terms.zt[sl].transpose(1, 2), torch.matmul(terms.u[sl], w1))
            x = act1(F.layer_norm(x.view(-1, c4), (c4,), ln.weight, ln.bias, ln.eps))  # rows (n i j a b)
            if fused and n == 1:
                # x W2 + (b2 + s0) in oneDNN's epilogue, then the exact GELU in place.
                y = torch.ops.mkldnn._linear_pointwise.binary(x, f0, w2_packed, None, "add")
                y = torch.ops.aten.gelu_(y) if gelu else act2(y)
            else:
                y = act2(torch.matmul(x.view(n, -1, c4), w2).add_(f0))  # n x 4N x (a2 b2 c8)
            return onednn.bmm_nt(hyp, y.reshape(n, h * w * 16, c8))  # n x k x (i j a b a2 b2)

        if b <= self.upscale_chunk:
            return _pixel_shuffle(upscale(slice(None)), h, w)
        out = hyper.new_empty((b, k, 4 * h, 4 * w))
        for start in range(0, b, self.upscale_chunk):
            sl = slice(start, start + self.upscale_chunk)
            _pixel_shuffle(upscale(sl), h, w, out=out[sl])
        return out

    def __call__(self, sparse: torch.Tensor, dense: Optional[torch.Tensor], multimask_output: bool,
                 embedding: Optional[torch.Tensor] = None,
                 mask_hidden: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Sam2MaskDecoder.forward` for the image predictor: low-res logits ``B x k x 4h x 4w``
        and IoU ``B x k`` (masks 1..3 with ``multimask_output``; else mask 0, or under the dynamic
        fallback the best of 1..3 where mask 0 is unstable). No object score."""
        dec = self.decoder
        low_rank = self.upscale_low_rank(sparse)
        queries, tokens, keys, low_rank = self.transformer(sparse, dense, embedding, mask_hidden, low_rank=low_rank)
        m = dec.num_mask_tokens
        dynamic = not multimask_output and dec.dynamic_multimask and not dec.training
        which = list(range(1, m)) if multimask_output else (list(range(m)) if dynamic else [0])
        out = self.final_tokens(queries, tokens, keys, [0] + [1 + i for i in which])
        iou = dec.iou_prediction_head(out[:, 0, :])[:, which]
        masks = self.upscale(self.hyper(out[:, 1:], which), keys, low_rank)
        if dynamic:
            masks, iou = dec.dynamic_fallback(masks, iou)
        return masks, iou
