"""A faster mask decoder that computes the same function as :class:`anyseg.modeling.mask_decoder.MaskDecoder`.

It reads the decoder's own weights (nothing is copied or re-keyed) and changes only the order of the
arithmetic, so in float32 its outputs match the faithful decoder to rounding (about 1e-5 relative):

* **Per-image cache.** Without a mask prompt the keys entering the first two-way block are the image
  embedding plus the constant "no mask" embedding, identical for every prompt. Their three projections
  used by that block (token-to-image keys and values, image-to-token queries) are computed once per image.
* **Few-token attention without projecting the image.** In token-to-image attention the T queries are
  few and the N = 4096 keys many. ``softmax(q (K Wk + bk)^T) (K Wv + bv)`` equals
  ``softmax((q Wk^T) K^T) K Wv + bv``: the key bias is constant along the softmax axis and the softmax
  rows sum to one. That costs ``heads * T * N * C`` instead of projecting all N keys. Image-to-token
  attention is rewritten the same way, with the output projection folded into the T values. The keys
  plus positional encoding are formed once per block and read by both attentions; with few prompts the
  first block's cached image-to-token logits are one product against a block-diagonal token matrix.
* **Mask prompts through the cache.** A mask prompt's dense embedding ends in a 1 x 1 convolution from
  ``m`` = 16 channels, ``dense = Wm h + bm``, so the first block's keys are the cached no-mask ones plus
  a rank-``m`` change and a constant. Its effect on the cached projections is folded into the few
  tokens (``(q Wk Wm) h^T`` and the like): products with ``m`` columns per prompt instead of projecting
  ``N x C`` keys (pass ``mask_hidden``, the features before that convolution).
* **Softmax over the few tokens across slabs.** Image-to-token attention normalises over the ``T``
  tokens for each image token and head; its logits are laid out ``T x H x N`` so that this softmax runs
  across contiguous slabs rather than along a short strided axis.
* **Positional term per head.** In the final attention the encoding's part of the logits is one
  product per head against the encoding's per-image key projection, instead of forming ``keys + pe``
  for every prompt.
* **Only the needed tokens** go through the final attention (the IoU token and the mask tokens asked
  for), and :meth:`FastDecoder.final` runs it for any range of them (each token attends on its own):
  segment everything runs it for the IoU token first and for the mask tokens of surviving prompts only.
* **Low-rank image tokens for the upscaling (CPU).** Each block adds a rank-``T H`` update to the image
  tokens and layer-normalises them (a per-token scale and shift), so the final image tokens are the
  cached keys, scaled per token, plus low-rank terms (:class:`LowRankImage`). The upscaling's first
  layer is linear: the cached keys go through it once per image, and per prompt only the low-rank
  terms do (about 116 instead of 256 columns for SAM).
* **Transposed convolutions as matrix products** on channels-last pixels (kernel = stride = 2 means
  each input pixel maps to its own 2 x 2 output block), with the pixel shuffle applied once, to the
  few output masks at the end, and only for the masks asked for. The hypernetworks' product puts the
  masks first (``k x C/8`` against the pixels, not the pixels against ``C/8 x k``), and the shuffle
  moves horizontally adjacent pairs of pixels as one wider element.
* **oneDNN products on a CPU** (:mod:`anyseg.fast.onednn`): the token MLPs with packed weights, the
  upscaling's second layer with its GELU fused, and a single prompt's products against the image
  tokens (summed in another order; rounding-level differences).
* **IoU first.** :meth:`FastDecoder.tokens` returns the predicted IoU before any upscaling, so
  segment-everything can drop prompts whose masks all fail the IoU filter without upscaling them.

Shapes: image embedding ``1 x C x h x w`` (C = 256, h = w = 64), sparse prompts ``B x T x C``,
dense prompts ``B x C x h x w`` (or None for "no mask"). Low-res logits come out ``B x k x 4h x 4w``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.mask_decoder import MaskDecoder
from ..modeling.transformer import Attention, TwoWayAttentionBlock
from . import onednn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x n x (H d)`` -> ``B x H x n x d``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _pe_logits(qh: torch.Tensor, pe_proj: torch.Tensor) -> torch.Tensor:
    """Per-head queries ``qh`` (``B x H x T x d``) against the image's projected positional encoding
    ``pe_proj`` (``1 x N x (H d)``): ``B x (H T) x N`` logits. One product with the heads as its batch:
    ``B T H d`` multiply-adds per image token instead of ``B T H C`` against the unprojected encoding."""
    b, heads, t, d = qh.shape
    n = pe_proj.shape[1]
    ph = pe_proj.squeeze(0).view(n, heads, d).permute(1, 2, 0)  # H x d x N
    out = torch.bmm(qh.transpose(0, 1).reshape(heads, b * t, d), ph).view(heads, b, t, n)
    return out.transpose(0, 1).reshape(b, heads * t, n)


def _token_to_image(attn: Attention, q: torch.Tensor, keys: torch.Tensor, keys_pe: Optional[torch.Tensor] = None,
                    pe_proj: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of ``B x T x C`` token queries over the image: keys the image tokens plus the positional
    encoding, values the image tokens ``keys`` (``B x N x C``). The keys are given summed
    (``keys_pe``, ``B x N x C``), or as ``keys`` and the encoding's key projection ``pe_proj``
    (``pe Wk^T``, ``1 x N x (H d)``, shared by all prompts): then the sum is never formed and its logits
    are ``(q Wk) keys^T + (q Wk) pe^T``, the second term one product per head against ``pe_proj``
    (cheaper than a pass over ``B x N x C``).

    The image is never projected: the key projection is folded into the queries (``(q Wk_h) keys_pe^T``;
    the key bias is constant along the softmax axis and dropped) and the value projection applied after
    pooling (``(P keys) Wv_h + bv``, rows of ``P`` sum to one). Returns ``B x T x C`` (after ``out_proj``).
    """
    heads = attn.num_heads
    b, t, _ = q.shape
    internal = attn.q_proj.out_features
    d = internal // heads
    c = keys.shape[-1]
    qh = _split_heads(attn.q_proj(q), heads) * (d**-0.5)  # B x H x T x d
    wk = attn.k_proj.weight.view(heads, d, c)  # H x d x C
    qk = torch.matmul(qh, wk).reshape(b, heads * t, c)  # B x HT x C
    if keys_pe is None:
        probs = onednn.bmm_nt(qk, keys, _pe_logits(qh, pe_proj)).softmax(dim=-1)  # B x HT x N
    else:
        probs = onednn.bmm_nt(qk, keys_pe).softmax(dim=-1)  # B x HT x N
    pooled = onednn.bmm_nt(probs, keys.transpose(1, 2)).view(b, heads, t, c)  # B x H x T x C
    wv = attn.v_proj.weight.view(heads, d, c)  # H x d x C
    out = torch.matmul(pooled, wv.transpose(1, 2)) + attn.v_proj.bias.view(1, heads, 1, d)  # B x H x T x d
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, internal))


@dataclass
class MaskTerm:
    """A mask prompt as a low-rank change of the first block's keys (see :meth:`FastDecoder.transformer`).

    The keys are ``cache.keys + hidden Wm^T + shift``: ``hidden`` ``B x N x m`` (the mask features before
    the prompt encoder's last 1 x 1 layer, times the mask weight), ``wm`` its ``C x m`` weight and
    ``shift`` ``B x C`` (or ``1 x C``) the layer's bias minus the no-mask embedding, times the mask weight.
    """

    hidden: torch.Tensor
    wm: torch.Tensor
    shift: torch.Tensor


def _token_to_image_cached(attn: Attention, q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor,
                           mask: Optional[MaskTerm] = None) -> torch.Tensor:
    """As :func:`_token_to_image` with the image side already projected: ``kh``, ``vh`` ``1 x H x N x d``
    shared by all prompts. With a ``mask`` term the keys are ``image + hidden Wm^T + shift``: the logits
    gain ``(q Wk Wm) hidden^T`` (the shift's part is constant along the softmax axis) and the output
    ``(P hidden) (Wv Wm)^T + Wv shift`` (rows of ``P`` sum to one): products with ``m`` columns only."""
    heads = attn.num_heads
    b, t, _ = q.shape
    d = kh.shape[-1]
    # Heads as the batch: H x (B T) x d against the shared H x N x d (no broadcast copies).
    qh = (attn.q_proj(q) * (d**-0.5)).view(b * t, heads, d).transpose(0, 1)
    logits = torch.bmm(qh, kh.squeeze(0).transpose(1, 2))  # H x BT x N
    if mask is not None:
        n, m = mask.hidden.shape[1:]
        ak = (attn.k_proj.weight @ mask.wm).view(heads, d, m)
        qa = torch.bmm(qh, ak).view(heads, b, t, m)
        logits = logits.view(heads, b, t, n) + torch.einsum("hbtm,bnm->hbtn", qa, mask.hidden)
        logits = logits.view(heads, b * t, n)
    probs = logits.softmax(dim=-1)
    out = torch.bmm(probs, vh.squeeze(0))  # H x BT x d
    if mask is not None:
        pooled = torch.einsum("hbtn,bnm->hbtm", probs.view(heads, b, t, n), mask.hidden)
        av = (attn.v_proj.weight @ mask.wm).view(heads, d, m)
        cv = (mask.shift @ attn.v_proj.weight.t()).view(-1, 1, heads, d).permute(2, 0, 1, 3)  # H x B x 1 x d
        out = (out.view(heads, b, t, d) + torch.einsum("hbtm,hdm->hbtd", pooled, av) + cv).view(heads, b * t, d)
    return attn.out_proj(out.transpose(0, 1).reshape(b, t, heads * d))


# Below this many token-head columns the cached image-to-token logits are one matrix product against a
# block-diagonal token matrix (an efficient shape) rather than a per-head product with inner size d.
_BLOCK_DIAGONAL_COLUMNS = 512

# Prompts upscaled together on a CPU. The upscaling network's B x 4h x 4w x C/8 float32 temporaries
# (8 MiB per prompt for SAM) then stay below the 128 MiB above which glibc maps each block afresh even
# with anyseg.speed.keep_freed_memory: 16 prompts (128 MiB and a header) were mapped and faulted in
# page by page for every chunk.
CPU_UPSCALE_CHUNK = 8


def _image_to_token_terms(attn: Attention, tok_k: torch.Tensor, tok_v: torch.Tensor, *,
                          keys_pe: Optional[torch.Tensor] = None, cached_q: Optional[torch.Tensor] = None,
                          mask: Optional[MaskTerm] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The attention of the image queries over ``B x T x C`` token keys / values as ``(z, u, shift)``:
    the block adds ``z @ u`` (``B x N x r`` times ``B x r x C``) and, with a mask term, the row ``shift``
    (``B x C`` or ``1 x C``) to its residual.

    The image queries are ``keys_pe`` (``B x N x C``: image tokens plus positional encoding), or
    ``cached_q``, their projection ``1 x N x (H d)`` shared by all prompts, with an optional ``mask``
    term (:class:`MaskTerm`) added to the image side. The arithmetic: the query projection folded into
    the token keys (``a``, plus a per-column constant from the query bias), logits laid out
    ``T x H x N`` so that the softmax over ``T`` runs across contiguous slabs, the output projection
    folded into the ``T`` values and its bias spread over them (the probabilities of each head sum to
    one): ``z`` are the probabilities and ``u`` those values, so the update is one ``baddbmm``.
    """
    heads = attn.num_heads
    b, t, _ = tok_k.shape
    internal = attn.q_proj.out_features
    d = internal // heads
    kh = _split_heads(attn.k_proj(tok_k), heads).transpose(1, 2) * (d**-0.5)  # B x T x H x d
    vh = _split_heads(attn.v_proj(tok_v), heads).transpose(1, 2)  # B x T x H x d
    wo = attn.out_proj.weight.view(-1, heads, d)  # C x H x d
    # Values pushed through the output projection, plus bias / H: B x (T H) x C.
    vo = torch.einsum("bthd,chd->bthc", vh, wo) + attn.out_proj.bias / heads
    vo = vo.reshape(b, t * heads, -1)
    if cached_q is not None:
        n = cached_q.shape[1]
        if b * t * heads <= _BLOCK_DIAGONAL_COLUMNS:
            # A block-diagonal (B T H) x (H d) against (H d) x N: row (b, t, h) holds kh[b, t, h] in columns
            # h d .. h d + d - 1, so the product is the B x (T H) x N logits in one call.
            # (A product with the identity rather than a copy into a diagonal view: ONNX export traces it.)
            bd = kh.permute(2, 3, 0, 1).unsqueeze(-1) * torch.eye(heads, dtype=kh.dtype, device=kh.device).view(
                heads, 1, 1, 1, heads)
            logits = torch.mm(bd.reshape(internal, b * t * heads).t(), cached_q.squeeze(0).t()).view(b, t * heads, n)
        else:
            # H x (B T) x d against H x d x N: heads as the batch, no broadcast copies.
            qh = cached_q.squeeze(0).view(n, heads, d).transpose(0, 1)
            logits = torch.bmm(kh.permute(2, 0, 1, 3).reshape(heads, b * t, d), qh.transpose(1, 2))  # H x BT x N
            logits = logits.view(heads, b, t, n).permute(1, 2, 0, 3).reshape(b, t * heads, n)
        if mask is not None:
            # Queries from image + hidden Wm^T + shift: logits gain (Wq Wm)^T kh hidden^T + (Wq shift) kh.
            m = mask.hidden.shape[-1]
            aq = (attn.q_proj.weight @ mask.wm).view(heads, d, m)
            g = torch.einsum("hdm,bthd->bthm", aq, kh).reshape(b, t * heads, m)
            cq = (mask.shift @ attn.q_proj.weight.t()).view(-1, 1, heads, d)
            const = (cq * kh).sum(-1).reshape(b, t * heads, 1)
            logits = torch.baddbmm(logits + const, g, mask.hidden.transpose(1, 2))
    else:
        wq = attn.q_proj.weight.view(heads, d, -1)  # H x d x C
        a = torch.einsum("bthd,hdc->bthc", kh, wq).reshape(b, t * heads, -1)  # B x TH x C
        const = (kh * attn.q_proj.bias.view(1, 1, heads, d)).sum(-1).reshape(b, t * heads, 1)
        logits = onednn.bmm_nt(a, keys_pe, const)  # B x TH x N
        n = logits.shape[2]
    # Laid out B x T x H x N, the softmax over T runs across contiguous slabs of H N (a softmax along a
    # short strided or contiguous axis is several times slower); z is its N x (T H) transpose (a view).
    probs = _softmax_slabs(logits.view(b, t, heads, n)).view(b, t * heads, n).transpose(1, 2)
    if mask is not None:
        # The residual is image + hidden Wm^T + shift: hidden rides along as m more columns of probs.
        wm = mask.wm.t().unsqueeze(0).expand(b, -1, -1)
        z = torch.cat([probs.transpose(1, 2), mask.hidden.transpose(1, 2)], dim=1).transpose(1, 2)
        return z, torch.cat([vo, wm], dim=1), mask.shift
    return probs, vo, None


def _softmax_slabs(x: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 (the few tokens of ``B x T x H x N``, or of ``H x T x N``). In a traced graph (ONNX export) it is written out as
    ``exp(x - max) / sum``, the same arithmetic: ONNX Runtime runs a ``Softmax`` along an axis other than
    the last by transposing it there and back, which made this the slowest node of the decoder graph
    (about 14 % of a click natively, more in WebAssembly)."""
    if not torch.jit.is_tracing():
        return x.softmax(dim=1)
    e = (x - x.amax(dim=1, keepdim=True)).exp()
    return e / e.sum(dim=1, keepdim=True)


# An integer type twice as wide as each float dtype, to move pairs of elements as one.
_PAIRS = {2: torch.int32, 4: torch.int64}


def _pixel_shuffle(m: torch.Tensor, h: int, w: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Upscaled logits ``n x k x (i j a b a2 b2)`` (two stride-2 transposed convolutions, each output
    pixel's 2 x 2 block kept together) -> ``n x k x 4h x 4w`` images, row ``4i + 2a + a2``, column
    ``4j + 2b + b2``, written into ``out`` when given. The two columns ``b2`` of a block are adjacent in
    both layouts, so outside a trace each pair moves as one element of twice the width: a copy along a
    2-element innermost axis runs about ten times slower than along a 1-element one (bit-exact either
    way)."""
    n, k = m.shape[:2]
    pair = _PAIRS.get(m.element_size())
    if pair is None or torch.jit.is_tracing() or not m.is_contiguous():
        shuffled = m.view(n, k, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)  # n k i a a2 j b b2
        if out is None:
            return shuffled.reshape(n, k, 4 * h, 4 * w)
        out.view(n, k, h, 2, 2, w, 2, 2).copy_(shuffled)
        return out
    shuffled = m.view(pair).view(n, k, h, w, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5)  # n k i a a2 j b (b2 pairs)
    if out is None:
        return shuffled.reshape(n, k, 4 * h, 2 * w).view(m.dtype)
    out.view(pair).view(n, k, h, 2, 2, w, 2).copy_(shuffled)
    return out


def upscaling_products(upscaling: nn.Sequential) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask decoder's upscaling network's two transposed convolutions (kernel = stride = 2) as matrix
    products on channels-last pixels: ``w1`` ``C x (a b C/4)``, ``b1``, ``w2`` ``C/4 x (a2 b2 C/8)``, ``b2``
    (each input pixel maps to its own 2 x 2 output block, kept together: see :func:`_pixel_shuffle`)."""
    up1, _, _, up2, _ = upscaling
    return (up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * up1.out_channels), up1.bias.repeat(4),
            up2.weight.permute(0, 2, 3, 1).reshape(up2.in_channels, 4 * up2.out_channels), up2.bias.repeat(4))


def _kept(store: dict, key, params: Sequence[torch.Tensor], make):
    """``make()``, a tensor derived from ``params``, kept in ``store`` under ``key`` until one of them
    changes (another object, storage or in-place version). Computed afresh under autograd or a trace,
    so gradients and traced graphs see the parameters themselves."""
    if torch.is_grad_enabled() or torch.jit.is_tracing():
        return make()
    stamp = tuple((id(p), p.data_ptr(), onednn.version(p)) for p in params)
    hit = store.get(key)
    if hit is None or hit[0] != stamp:
        hit = (stamp, make())
        store[key] = hit
    return hit[1]


@dataclass
class ImageCache:
    """Prompt-independent decoder work for one image embedding (see the module docstring).

    image: ``1 x N x C`` image tokens; keys: those plus the no-mask embedding; pe: ``1 x N x C``;
    kh0, vh0: ``1 x H x N x d`` first-block token-to-image key and value projections (of keys plus pe,
    and of keys); q0: ``1 x N x (H d)`` first-block image-to-token query projection (of keys plus pe).
    """

    embedding: torch.Tensor
    size: Tuple[int, int]
    image: torch.Tensor
    pe: torch.Tensor
    keys: torch.Tensor
    kh0: Optional[torch.Tensor]
    vh0: Optional[torch.Tensor]
    q0: Optional[torch.Tensor]
    kept: dict = field(default_factory=dict)  # per-image tensors formed on first use (see _kept): K G W1, pe Wk^T


@dataclass
class LowRankTerms:
    """``keys = alpha * (K G) + Z U`` (see :class:`LowRankImage`): ``alpha`` ``B x N``, ``zt`` = ``Z^T``
    ``B x r x N`` (the layout the blocks' probabilities come in), ``u`` ``B x r x C``, ``gamma`` the
    diagonal ``G`` (``C``)."""

    alpha: torch.Tensor
    zt: torch.Tensor
    u: torch.Tensor
    gamma: torch.Tensor

    @property
    def z(self) -> torch.Tensor:
        """``Z``, ``B x N x r`` (a view)."""
        return self.zt.transpose(1, 2)


@dataclass
class _BlockUpdate:
    """One block's ``keys' = norm(keys + z u (+ shift))`` and its norm's row statistics."""

    z: torch.Tensor  # B x N x r (the transpose of a B x r x N tensor)
    u: torch.Tensor  # B x r x C (or 1 x r x C)
    shift: Optional[torch.Tensor]  # B x C, 1 x C or None
    mean: torch.Tensor  # B x N x 1
    rstd: torch.Tensor  # B x N x 1
    gamma: torch.Tensor
    beta: torch.Tensor

    def select(self, index) -> "_BlockUpdate":
        def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return t if t is None or t.shape[0] == 1 else t[index]
        return _BlockUpdate(self.z[index], pick(self.u), pick(self.shift), self.mean[index], self.rstd[index],
                            self.gamma, self.beta)


class LowRankImage:
    """The processed image tokens as the per-image keys plus per-prompt low-rank terms.

    Each two-way block ends with ``keys' = norm(keys + z u)``, a layer norm that scales and shifts each
    token (row): ``(x - mean) * rstd * gamma + beta``. Starting from the cached keys ``K`` (image plus
    no-mask embedding), after every block ``keys = alpha * (K G) + Z U`` (:meth:`terms`): ``alpha``
    (``B x N``) the product of the rows' ``rstd``, ``G`` the product of the norms' ``gamma`` (a
    diagonal), and ``Z`` (``B x N x r``) / ``U`` (``B x r x C``) collect each block's update ``z u``, its
    mean and its ``beta`` (``r`` = 58 per block for SAM: 56 token-head columns, mean and beta). Any
    linear map ``W`` of the final keys is then ``alpha * (K G W) + Z (U W)``, where ``K G W`` is computed
    once per image: the upscaling's first layer costs ``N r`` instead of ``N C`` per output column.
    Exact arithmetic, reordered (float32 rounding only).

    The blocks' updates are only kept (the probabilities and values they computed anyway); the terms
    are formed on first use, so prompts that are never upscaled (segment-everything's filter) cost
    nothing more. :meth:`select` keeps some prompts.
    """

    def __init__(self, steps: Sequence[_BlockUpdate]) -> None:
        self.steps = list(steps)
        self._terms: Optional[LowRankTerms] = None

    def select(self, index) -> "LowRankImage":
        """The prompts ``index`` (a 1-D index tensor or a slice), their terms not formed yet."""
        return LowRankImage([step.select(index) for step in self.steps])

    def terms(self) -> LowRankTerms:
        """``alpha``, ``Z``, ``U`` and ``G`` (formed once)."""
        if self._terms is None:
            terms = None
            for step in self.steps:
                terms = _low_rank_step(terms, step)
            self._terms = terms
        return self._terms


def _low_rank_step(image: Optional[LowRankTerms], step: _BlockUpdate) -> LowRankTerms:
    """One block's update applied to the representation ``keys = alpha * (K G) + Z U`` (``image``;
    None: the cached keys ``K`` themselves). See :class:`LowRankImage`."""
    z, u, shift, mean, rstd, gamma, beta = step.z, step.u, step.shift, step.mean, step.rstd, step.gamma, step.beta
    b, n = mean.shape[:2]
    c = u.shape[-1]
    # Columns of Z as rows of Z^T (B x r x N): the row-wise products below run along N.
    cols, rows = [z.transpose(1, 2).expand(b, -1, -1)], [u.expand(b, -1, -1)]
    if shift is not None:
        cols.append(mean.new_ones(1, 1, 1).expand(b, 1, n))
        rows.append(shift.reshape(-1, 1, c).expand(b, 1, c))
    if image is not None:
        cols.insert(0, image.zt)
        rows.insert(0, image.u.expand(b, -1, -1))
    cols.append(mean.transpose(1, 2))
    rows.append(-gamma.new_ones(1, 1, c).expand(b, 1, c))
    # Z'^T = [rstd * (Z, z, 1, mean), 1]^T, written row block by row block into one buffer
    r = sum(col.shape[1] for col in cols)
    zt_new = mean.new_empty(b, r + 1, n)
    rstd_t = rstd.transpose(1, 2)
    start = 0
    for col in cols:
        torch.mul(col, rstd_t, out=zt_new[:, start : start + col.shape[1]])
        start += col.shape[1]
    zt_new[:, r] = 1
    u_new = torch.cat([torch.cat(rows, dim=1) * gamma, beta.view(1, 1, c).expand(b, 1, c)], dim=1)
    alpha = rstd.squeeze(-1) if image is None else image.alpha * rstd.squeeze(-1)
    g = gamma if image is None else image.gamma * gamma
    return LowRankTerms(alpha, zt_new, u_new, g)


class FastDecoder:
    """Decode prompts against one image with a :class:`MaskDecoder`'s weights, reusing per-image work.

    Args:
        decoder: the model's mask decoder (weights are read, never modified).
        image_pe: ``1 x C x h x w`` dense positional encoding (``prompt_encoder.get_dense_pe()``).
        no_mask_embed: ``1 x C`` embedding added to the image when there is no mask prompt.
        upscale_chunk: prompts upscaled together (bounds the ``B x 4h x 4w x C/8`` intermediate).
        mask_projection: the prompt encoder's last mask-downscaling layer (a 1 x 1 ``Conv2d`` from ``m``
            channels to C), needed to decode mask prompts given as ``mask_hidden``.
    """

    def __init__(self, decoder: MaskDecoder, image_pe: torch.Tensor, no_mask_embed: torch.Tensor,
                 upscale_chunk: int = 16, mask_projection: Optional[nn.Conv2d] = None) -> None:
        self.decoder = decoder
        self.image_pe = image_pe
        self.no_mask_embed = no_mask_embed
        self.upscale_chunk = max(1, int(upscale_chunk))
        if mask_projection is not None and (not isinstance(mask_projection, nn.Conv2d)
                                            or mask_projection.kernel_size != (1, 1)):
            raise ValueError(f"mask_projection must be a 1 x 1 Conv2d, got {mask_projection!r}")
        self.mask_projection = mask_projection
        self.cache: Optional[ImageCache] = None
        self._weights: dict = {}  # weights re-laid-out from the decoder's parameters (see _kept)

    def __getstate__(self) -> dict:
        # The kept weights (packed oneDNN tensors among them, which cannot be copied) are made again
        # on first use by a copy.
        state = self.__dict__.copy()
        state["_weights"] = {}
        return state

    # ------------------------------------------------------------------------------------ per image
    def set_image(self, embedding: torch.Tensor, project: bool = True) -> ImageCache:
        """Precompute the prompt-independent work for a ``1 x C x h x w`` embedding.

        With ``project=False`` the first-block projections are skipped (``kh0``, ``vh0``, ``q0`` stay
        None): enough for decoding with a mask prompt (``dense`` given), which never uses them. This is
        how a single-call graph (ONNX export) uses the decoder.
        """
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"expected a 1 x C x h x w image embedding, got shape {tuple(embedding.shape)}")
        _, c, h, w = embedding.shape
        # Token-major (``1 x N x C``) contiguous copies: every later pass over the image runs along C.
        pe = self.image_pe.to(embedding.dtype).flatten(2).transpose(1, 2).contiguous()
        image = embedding.flatten(2).transpose(1, 2).contiguous()
        keys = image + self.no_mask_embed.to(embedding.dtype).view(1, 1, c)
        kh0 = vh0 = q0 = None
        if project:
            keys_pe = keys + pe
            block: TwoWayAttentionBlock = self.decoder.transformer.layers[0]
            t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
            kh0 = _split_heads(t2i.k_proj(keys_pe), t2i.num_heads)
            vh0 = _split_heads(t2i.v_proj(keys), t2i.num_heads)
            q0 = i2t.q_proj(keys_pe).contiguous()
        self.cache = ImageCache(embedding, (h, w), image, pe, keys, kh0, vh0, q0)
        return self.cache

    def _require(self, embedding: Optional[torch.Tensor]) -> ImageCache:
        if embedding is not None and (self.cache is None or self.cache.embedding is not embedding):
            self.set_image(embedding)
        if self.cache is None:
            raise ValueError("FastDecoder.set_image(embedding) must be called before decoding")
        return self.cache

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The two-way blocks' token MLP (``lin1 -> act -> lin2``), through oneDNN with its weights kept
        packed and the activation fused where :mod:`anyseg.fast.onednn` can serve; else the module."""
        name = onednn.activation_name(mlp.act)
        if name is None:
            return mlp(x)
        key = ("mlp", id(mlp))  # the PackedLinears hold mlp's layers, so the id is not reused meanwhile
        if key not in self._weights:
            self._weights[key] = (onednn.PackedLinear(mlp.lin1, name, rows=8), onednn.PackedLinear(mlp.lin2, rows=8))
        first, second = self._weights[key]
        return second(first(x))

    def _pe_projection(self, attn: Attention) -> torch.Tensor:
        """``pe Wk^T`` (``1 x N x (H d)``, no bias) for ``attn``'s key projection, once per image (made
        again if the weight changes), in the encoding's dtype whatever autocast is on: calls with and
        without autocast can share it (autocast casts it where it applies)."""
        cache = self._require(None)
        weight = attn.k_proj.weight

        def make() -> torch.Tensor:
            with torch.autocast(cache.pe.device.type, enabled=False):
                return torch.matmul(cache.pe, weight.t().to(cache.pe.dtype))

        return _kept(cache.kept, ("pe_k", id(attn)), [weight], make)

    def _mask_term(self, cache: ImageCache, mask_hidden: torch.Tensor,
                   mask_present: Optional[torch.Tensor]) -> MaskTerm:
        """The mask prompt ``mask_hidden`` (``B x m x h x w``, before the 1 x 1 layer ``dense = Wm h + bm``)
        as a change of the cached no-mask keys: ``keys = image + dense = cache.keys + Wm h + (bm - no_mask)``.
        ``mask_present`` (``B`` or 1 values, 1 or 0) scales the change: 0 gives the no-mask embedding (how
        a single-call graph switches)."""
        conv = self.mask_projection
        if conv is None:
            raise ValueError("mask_hidden needs FastDecoder(..., mask_projection=<the 1 x 1 mask layer>)")
        if cache.kh0 is None:
            raise ValueError("mask_hidden needs set_image(embedding, project=True)")
        if mask_hidden.ndim != 4 or mask_hidden.shape[1] != conv.in_channels or tuple(mask_hidden.shape[2:]) != cache.size:
            raise ValueError(f"expected mask_hidden of shape B x {conv.in_channels} x {cache.size[0]} x "
                             f"{cache.size[1]}, got {tuple(mask_hidden.shape)}")
        dtype = mask_hidden.dtype
        hidden = mask_hidden.flatten(2).transpose(1, 2)  # B x N x m
        shift = (conv.bias - self.no_mask_embed.view(-1)).to(dtype).unsqueeze(0)  # 1 x C
        if mask_present is not None:
            scale = mask_present.to(dtype).reshape(-1, 1)
            hidden = hidden * scale.unsqueeze(-1)
            shift = shift * scale
        return MaskTerm(hidden.contiguous(), conv.weight.flatten(1).to(dtype), shift)

    # ------------------------------------------------------------------------------------ decoding
    def transformer(self, sparse: torch.Tensor, dense: Optional[torch.Tensor] = None,
                    embedding: Optional[torch.Tensor] = None, mask_hidden: Optional[torch.Tensor] = None,
                    mask_present: Optional[torch.Tensor] = None, low_rank: bool = False):
        """The two-way blocks for ``B`` prompts, without the final attention: ``(queries, tokens, keys)``,
        the ``B x T x C`` token states and inputs and the ``B x N x C`` processed image tokens, for
        :meth:`final`. Arguments as :meth:`tokens`. With ``low_rank`` a fourth item, the image tokens as
        a :class:`LowRankImage` for :meth:`masks` (None where it does not apply: a ``dense`` mask
        prompt, a reduced dtype, or autograd on)."""
        cache = self._require(embedding)
        if dense is not None and mask_hidden is not None:
            raise ValueError("give a mask prompt as dense or as mask_hidden, not both")
        dec = self.decoder
        b = sparse.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).to(sparse.dtype)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        layers = dec.transformer.layers
        queries, keys, keys_pe = tokens, None, None
        pe = cache.pe
        mask = None if mask_hidden is None else self._mask_term(cache, mask_hidden, mask_present)
        kh, vh, q0 = cache.kh0, cache.vh0, cache.q0
        track = (low_rank and dense is None and cache.keys.dtype == torch.float32 and not torch.is_grad_enabled()
                 and not torch.is_autocast_enabled(cache.keys.device.type))
        steps = []
        for i, layer in enumerate(layers):
            queries = layer.token_self_attention(queries, tokens)
            q = queries + tokens
            shared = i == 0 and dense is None
            if shared and kh is None:
                raise ValueError("decoding without a mask prompt needs set_image(embedding, project=True)")
            if shared:
                attn_out = _token_to_image_cached(layer.cross_attn_token_to_image, q, kh, vh, mask)
            else:
                if keys is None:  # first block with a mask prompt
                    keys = (cache.image + dense.flatten(2).transpose(1, 2)).contiguous()
                keys_pe = keys + pe  # both attentions of the block read it
                attn_out = _token_to_image(layer.cross_attn_token_to_image, q, keys, keys_pe=keys_pe)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + self._mlp(layer.mlp, queries))
            q = queries + tokens
            attn = layer.cross_attn_image_to_token
            if shared:
                z, u, shift = _image_to_token_terms(attn, q, queries, cached_q=q0, mask=mask)
                residual = cache.keys if shift is None else cache.keys + shift.unsqueeze(1)
                summed = torch.baddbmm(residual, z, u)
            else:
                z, u, shift = _image_to_token_terms(attn, q, queries, keys_pe=keys_pe)
                # keys (made in this call, read by nothing after this block) takes the update in place,
                # unless autocast would compute it in another dtype than the keys'
                own = not (torch.is_grad_enabled() and keys.requires_grad) and not torch.is_autocast_enabled(
                    keys.device.type)
                summed = keys.baddbmm_(z, u) if own else torch.baddbmm(keys, z, u)
            keys_pe = None
            norm = layer.norm4
            if track:
                keys, mean, rstd = torch.native_layer_norm(summed, norm.normalized_shape, norm.weight, norm.bias,
                                                           norm.eps)
                steps.append(_BlockUpdate(z, u, shift, mean, rstd, norm.weight, norm.bias))
            else:
                keys = norm(summed)
            del summed
        if low_rank:
            return queries, tokens, keys, LowRankImage(steps) if track else None
        return queries, tokens, keys

    def final(self, queries: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor, first: int,
              stop: int) -> torch.Tensor:
        """The final token-to-image attention (and its norm) for tokens ``first .. stop - 1`` only: each
        token attends to the image independently of the others. Returns ``B x (stop - first) x C``."""
        tf = self.decoder.transformer
        queries, tok = queries[:, first:stop], tokens[:, first:stop]
        attn, q = tf.final_attn_token_to_image, queries + tok
        if not torch.jit.is_tracing():
            # The positional term of the logits per head against the encoding's per-image key projection,
            # instead of a pass forming keys + pe per prompt. (A trace, the single-call graph of ONNX
            # export, keeps keys + pe: no per-image state.)
            out = _token_to_image(attn, q, keys, pe_proj=self._pe_projection(attn))
        else:
            out = _token_to_image(attn, q, keys, keys_pe=keys + self.cache.pe)
        return tf.norm_final_attn(queries + out)

    def final_tokens(self, queries: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor,
                     index: Sequence[int]) -> torch.Tensor:
        """:meth:`final` for the tokens ``index`` (any list of token positions): ``B x len(index) x C``."""
        index = list(index)
        if index == list(range(index[0], index[0] + len(index))):
            return self.final(queries, tokens, keys, index[0], index[0] + len(index))
        sel = torch.tensor(index, device=queries.device)
        return self.final(queries.index_select(1, sel), tokens.index_select(1, sel), keys, 0, len(index))

    def tokens(self, sparse: torch.Tensor, dense: Optional[torch.Tensor] = None,
               embedding: Optional[torch.Tensor] = None, mask_hidden: Optional[torch.Tensor] = None,
               mask_present: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the two-way transformer for ``B`` prompts.

        Args:
            sparse: ``B x T x C`` prompt tokens; dense: ``B x C x h x w`` mask-prompt embedding, or None
                for no mask prompt (the cached fast path).
            mask_hidden: instead of ``dense``, the mask prompt before the prompt encoder's last 1 x 1
                layer (``B x m x h x w``; needs ``mask_projection``): it then goes through the per-image
                cache too. mask_present: ``B`` (or 1) weights, 1 for a mask prompt, 0 for none.
        Returns:
            ``iou`` ``B x (1 + m)`` (all mask tokens), ``mask_tokens`` ``B x (1 + m) x C`` and the
            processed image tokens ``B x N x C``.
        """
        queries, tokens, keys = self.transformer(sparse, dense, embedding, mask_hidden, mask_present)
        n_out = 1 + self.decoder.num_mask_tokens
        out = self.final(queries, tokens, keys, 0, n_out)  # only the IoU and mask tokens are read
        return self.decoder.iou_prediction_head(out[:, 0, :]), out[:, 1:], keys

    def upscale_low_rank(self, like: torch.Tensor) -> bool:
        """Whether :meth:`upscale` should be given a :class:`LowRankImage` for tensors on ``like``'s
        device: on a CPU (fewer multiply-adds); not on a GPU, where the upscaling's products are cheap
        and the representation's ``B x N x r`` terms would add memory and kernel launches."""
        return like.device.type == "cpu"

    def _upscale_base(self, gamma: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        """``K G W1`` for :class:`LowRankImage` (``1 x N x 4 C/4``), once per image."""
        cache = self._require(None)
        params = [self.decoder.output_upscaling[0].weight] + [layer.norm4.weight for layer in self.decoder.transformer.layers]
        return _kept(cache.kept, "upscale_base", params, lambda: torch.matmul(cache.keys * gamma, w1))

    def masks(self, mask_tokens: torch.Tensor, image_tokens: torch.Tensor, which: Sequence[int],
              low_rank: Optional[LowRankImage] = None) -> torch.Tensor:
        """Upscale and apply the hypernetworks: ``B x m x C`` mask tokens and ``B x N x C`` image tokens ->
        low-res logits ``B x len(which) x 4h x 4w`` for the mask indices ``which``. ``low_rank``: the
        same image tokens as a :class:`LowRankImage` (from :meth:`transformer`), which makes the
        upscaling's first layer cheaper."""
        which = list(which)
        return self.upscale(self.hyper(mask_tokens[:, which], which), image_tokens, low_rank)

    def hyper(self, mask_tokens: torch.Tensor, which: Sequence[int]) -> torch.Tensor:
        """The hypernetworks of the masks ``which`` on their tokens: ``B x len(which) x C`` (token ``j``
        the one of mask ``which[j]``) -> ``B x len(which) x C/8``, for :meth:`upscale`. Several masks go
        through their MLPs together, one batched product per layer on the MLPs' stacked weights."""
        mlps = self.decoder.output_hypernetworks_mlps
        which = list(which)
        if len(which) == 1 or torch.jit.is_tracing():
            return torch.stack([mlps[i](mask_tokens[:, j, :]) for j, i in enumerate(which)], dim=1)
        chosen = [mlps[i] for i in which]
        layers = _kept(self._weights, ("hyper", tuple(which)), [p for mlp in chosen for p in mlp.parameters()], lambda: [
            (torch.stack([mlp.layers[j].weight.t() for mlp in chosen]),
             torch.stack([mlp.layers[j].bias for mlp in chosen]).unsqueeze(1))
            for j in range(len(chosen[0].layers))])
        x = mask_tokens.transpose(0, 1)  # k x B x C
        for j, (weight_t, bias) in enumerate(layers):
            x = torch.baddbmm(bias, x, weight_t)
            if j < len(layers) - 1:
                x = torch.relu(x)
        return x.transpose(0, 1)

    def upscale(self, hyper: torch.Tensor, image_tokens: torch.Tensor,
                 low_rank: Optional[LowRankImage]) -> torch.Tensor:
        """The upscaling network and the hypernetworks' product: ``B x k x C/8`` hypernetwork outputs
        and the ``B x N x C`` image tokens (and their :class:`LowRankImage`, or None) -> ``B x k x 4h x 4w``
        low-res logits."""
        cache = self._require(None)
        dec = self.decoder
        h, w = cache.size
        b, k = hyper.shape[:2]
        up1, ln, act1, up2, act2 = dec.output_upscaling
        c = up1.in_channels
        c4, c8 = up1.out_channels, up2.out_channels
        w1, b1, w2, b2 = _kept(self._weights, "upscale", [up1.weight, up1.bias, up2.weight, up2.bias],
                               lambda: upscaling_products(dec.output_upscaling))
        # The second layer through oneDNN with its exact GELU fused in (same values as PyTorch's GELU).
        fused = onednn.activation_name(act2) == "gelu" and onednn.usable(image_tokens, up2.weight, up2.bias)
        if fused:
            w2_packed = _kept(self._weights, "upscale_packed", [up2.weight],
                              lambda: onednn.pack(w2.t(), h * w * 4))

        terms = None if low_rank is None else low_rank.terms()
        base = None if terms is None else self._upscale_base(terms.gamma, w1)

        def upscale(sl: slice) -> torch.Tensor:
            """Prompts ``sl`` -> ``n x k x (i j a b a2 b2)`` logits (rows 4i + 2a + a2, columns 4j + 2b + b2)."""
            hyp = hyper[sl]
            n = hyp.shape[0]
            if terms is None:
                x = torch.addmm(b1, image_tokens[sl].reshape(-1, c), w1)  # (n N) x (a b c4)
            else:  # alpha * (K G W1) + Z (U W1) + b1
                x = torch.addcmul(b1, base, terms.alpha[sl].unsqueeze(-1))
                x = x.baddbmm_(terms.zt[sl].transpose(1, 2), torch.matmul(terms.u[sl], w1))
            x = F.layer_norm(x.view(-1, c4), (c4,), ln.weight, ln.bias, ln.eps)
            x = act1(x)
            if fused:
                x = onednn.linear(x, w2.t(), b2, "gelu", packed=w2_packed)
            else:
                x = act2(torch.addmm(b2, x, w2))  # (n N a b) x (a2 b2 c8)
            # Masks first: a product with k output columns runs several times slower than one with k rows.
            return onednn.bmm_nt(hyp, x.view(n, h * w * 16, c8))  # n x k x (i j a b a2 b2)

        if b <= self.upscale_chunk:  # one piece (also the traceable form used by ONNX export)
            return _pixel_shuffle(upscale(slice(None)), h, w)
        out = hyper.new_empty((b, k, 4 * h, 4 * w))
        for start in range(0, b, self.upscale_chunk):
            sl = slice(start, start + self.upscale_chunk)
            _pixel_shuffle(upscale(sl), h, w, out=out[sl])
        return out

    def __call__(self, sparse: torch.Tensor, dense: Optional[torch.Tensor], multimask_output: bool,
                 embedding: Optional[torch.Tensor] = None,
                 mask_hidden: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``MaskDecoder.forward``: low-res logits ``B x k x 4h x 4w`` and IoU ``B x k``
        (``mask_hidden`` as in :meth:`tokens`). The final attention runs for the IoU token and the mask
        tokens asked for only."""
        dec = self.decoder
        # The low-rank upscaling saves multiply-adds, which is what a CPU is short of; on a GPU the
        # click is bound by kernel launches, and the extra bookkeeping kernels would not pay.
        low_rank = self.upscale_low_rank(sparse)
        queries, tokens, keys, low_rank = self.transformer(sparse, dense, embedding, mask_hidden, low_rank=low_rank)
        m = dec.num_mask_tokens
        which = list(range(1, m)) if multimask_output else [0]
        out = self.final_tokens(queries, tokens, keys, [0] + [1 + i for i in which])
        iou = dec.iou_prediction_head(out[:, 0, :])[:, which]
        return self.upscale(self.hyper(out[:, 1:], which), keys, low_rank), iou
