"""The labelling page's low-rank decoder graphs: SAM 1's decoder per click (with or without a mask
prompt), with the image side never formed.

Why this is the same function
-----------------------------
Without a mask prompt the image tokens entering the two-way transformer, ``X0`` (the image embedding
plus the no-mask embedding, ``N x C``), are the same for every prompt; a mask prompt adds a rank-16
term and a constant row to them (its embedding's last layer is a 1 x 1 convolution from 16 channels).
Each block changes them in two ways only:

* the image-to-token attention adds ``P V``: ``P`` the ``N x (T H)`` attention probabilities of the image
  tokens over the ``T`` prompt tokens (``H`` heads) and ``V`` the ``T H`` token values pushed through
  the output projection, a rank-``T H`` change;
* the layer norm after it subtracts a per-token mean, divides by a per-token deviation and applies the
  norm's weight ``g`` and bias ``b``.

So after block ``l`` the image tokens are ``X_l = diag(a_l) X0 diag(G_l) + Z_l M_l``: a per-token scale
``a_l`` (the product of the deviations' inverses), the diagonal ``G_l`` (the product of the norms'
weights), and a low-rank part ``Z_l M_l`` with ``Z_l`` ``N x r`` and ``M_l`` ``r x C`` (``r`` = ``2 T H + 4``
after the second block). Everything the decoder does with the image tokens is linear in them, or is a
layer norm whose statistics follow from inner products:

* attention logits and pooled values against ``X_l`` are ``a_l`` times the same products against
  ``X0 diag(G_l)`` projected once per image (``N x d`` per head), plus products with ``Z_l``;
* a layer norm's mean and variance per token are ``a``, ``Z`` and per-image inner products of ``X0`` with
  the weights the rows of ``M`` come from (the output projections, the norms' weights and biases);
* the upscaling network's first layer (a linear map per token, its transposed convolution has
  kernel = stride) is ``a_2`` times ``X0 diag(G_2) W1``, once per image, plus ``Z_2 (M_2 W1)``.

The per-image graph (:class:`PageImageGraph`) computes the ``X0`` products; the per-click graph
(:class:`PageClickGraph`) never forms an ``N x C`` image tensor before the upscaling: its products with
the image have ``d`` = 16 or ``r`` columns instead of ``C`` = 256. It is the float32 decoder to rounding
(the variance is taken as ``E[x^2] - E[x]^2``, which loses a few more bits than the two-pass form where
the mean is large against the spread; the tests hold it to the faithful decoder).

The page runs the graph for the three multimask candidates (the single-mask output is never shown).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..fast.decoder import _pixel_shuffle, _softmax_slabs, upscaling_products
from .decoder import SamOnnxDecoder, _plain_copy

#: Per-image tensors the click graph takes, in order (outputs of the per-image graph, same names).
IMAGE_TENSORS = ("lr_kh0", "lr_vh0", "lr_qh0", "lr_xwo0", "lr_kh1", "lr_vh1", "lr_qh1", "lr_xwo0g", "lr_xwo1",
                 "lr_kh2", "lr_vh2", "lr_base", "lr_stats")
#: The per-image tensors that the click graph with a mask prompt takes besides (``X0`` times the mask
#: embedding's last layer, for the layer norms' statistics).
MASK_TENSORS = ("lr_xwm", "lr_xwmg")


def upscale_grid(input_size, img_size: int, grid: int) -> Tuple[int, int]:
    """Token rows and columns (of the ``grid x grid`` image tokens) whose upscaled logits the model's
    postprocessing reads for an image resized to ``input_size`` (H, W) in the ``img_size`` frame: the
    low-res map is upscaled bilinearly to ``img_size`` and cropped to the image, and the last frame row
    ``H - 1`` reads low-res rows up to ``floor((H - 0.5) / 4 - 0.5) + 1``. The same formula as
    ``upscaleGrid`` in ``static/decoders.js``."""
    per_token = img_size // grid
    return tuple(min(grid, (int(v) + 1) // per_token + 1) for v in input_size)


def supported(model) -> bool:
    """Whether the low-rank graphs apply to ``model``: a SAM 1 decoder with two two-way blocks."""
    dec = getattr(model, "mask_decoder", None)
    layers = getattr(getattr(dec, "transformer", None), "layers", None)
    return layers is not None and len(layers) == 2 and layers[0].skip_first_layer_pe and not layers[1].skip_first_layer_pe


class _Parts(nn.Module):
    """The prompt encoder and mask decoder (float32 copies) and the shapes the graphs use."""

    def __init__(self, model) -> None:
        super().__init__()
        if not supported(model):
            raise ValueError("the low-rank page graphs need a SAM 1 mask decoder with two two-way blocks")
        self.prompt_encoder = _plain_copy(model.prompt_encoder, False)
        self.mask_decoder = _plain_copy(model.mask_decoder, False)
        self.img_size = int(model.img_size)
        attn = self.mask_decoder.transformer.layers[0].cross_attn_token_to_image
        self.heads = attn.num_heads
        self.d = attn.q_proj.out_features // self.heads
        self.dim = attn.q_proj.in_features
        size = tuple(int(v) for v in self.prompt_encoder.image_embedding_size)
        self.size = size
        pe = self.prompt_encoder.get_dense_pe().detach().float()
        self.register_buffer("pe_tokens", pe.flatten(2)[0].t().contiguous(), persistent=False)  # N x C

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """``n x (H d)`` -> ``H x n x d``."""
        return x.reshape(x.shape[0], self.heads, self.d).transpose(0, 1)


class PageImageGraph(_Parts):
    """Per image: ``image_embeddings`` (``1 x C x h x w``) -> the :data:`IMAGE_TENSORS` (see the module docs).

    ``lr_kh0``/``lr_vh0``: the first block's token-to-image key (of image plus positional encoding, no
    bias) and value (no bias) projections; ``lr_qh0``: its image-to-token query projection (with bias);
    ``lr_xwo0``, ``lr_xwo0g``, ``lr_xwo1``: ``X0`` times the image-to-token output projections (for the
    layer norms' statistics); ``lr_kh1``/``lr_vh1``/``lr_qh1`` and ``lr_kh2``/``lr_vh2``: the second
    block's and the final attention's projections of ``X0 diag(G)``. Values are ``H x N x d``, the others
    ``H x d x N`` (the image axis last, as the products against few tokens want it). ``lr_base``:
    ``X0 diag(G_2) W1``, ``N x 4 c4``; ``lr_stats``: ``11 x N`` per-token inner products; ``lr_xwm``,
    ``lr_xwmg``: ``X0`` times the mask embedding's last layer (``m x N``, for a mask prompt)."""

    def forward(self, image_embeddings: torch.Tensor):
        dec = self.mask_decoder
        l0, l1 = dec.transformer.layers
        fin = dec.transformer.final_attn_token_to_image
        x0 = image_embeddings.flatten(2)[0].t() + self.prompt_encoder.no_mask_embed.weight  # N x C
        xpe = x0 + self.pe_tokens
        hp = self.heads_of

        def ht(x):  # N x (H d) -> H x d x N
            return hp(x).transpose(1, 2)

        g1, b1, g2 = l0.norm4.weight, l0.norm4.bias, l1.norm4.weight
        xg1 = x0 * g1
        xg12 = xg1 * g2
        wo0, bo0 = l0.cross_attn_image_to_token.out_proj.weight, l0.cross_attn_image_to_token.out_proj.bias
        wo1, bo1 = l1.cross_attn_image_to_token.out_proj.weight, l1.cross_attn_image_to_token.out_proj.bias
        w1 = upscaling_products(dec.output_upscaling)[0]
        conv = self.prompt_encoder.mask_projection
        wm = conv.weight.flatten(1)  # C x m
        shift = conv.bias - self.prompt_encoder.no_mask_embed.weight[0]  # a mask prompt's constant change of X0
        stats = torch.stack([
            x0.mean(-1), (x0 * x0).sum(-1), x0 @ bo0,          # block 0: mean, sum of squares, . bo0
            xg1.sum(-1), (xg1 * xg1).sum(-1), x0 @ (g1 * g1 * bo0),  # block 1: . g1, |x g1|^2, . g1^2 bo0
            x0 @ (g1 * g1), x0 @ (g1 * b1), xg1 @ bo1,         # . g1^2, . g1 b1, . g1 bo1
            x0 @ shift, x0 @ (g1 * g1 * shift),                # a mask prompt: . shift, . g1^2 shift
        ], dim=0)
        return (
            ht(xpe @ l0.cross_attn_token_to_image.k_proj.weight.t()),
            hp(x0 @ l0.cross_attn_token_to_image.v_proj.weight.t()),
            ht(F.linear(xpe, l0.cross_attn_image_to_token.q_proj.weight, l0.cross_attn_image_to_token.q_proj.bias)),
            ht(x0 @ wo0),
            ht(xg1 @ l1.cross_attn_token_to_image.k_proj.weight.t()),
            hp(xg1 @ l1.cross_attn_token_to_image.v_proj.weight.t()),
            ht(xg1 @ l1.cross_attn_image_to_token.q_proj.weight.t()),
            ht((x0 * (g1 * g1)) @ wo0),
            ht(xg1 @ wo1),
            ht(xg12 @ fin.k_proj.weight.t()),
            hp(xg12 @ fin.v_proj.weight.t()),
            xg12 @ w1,
            stats,
            (x0 @ wm).t(),  # m x N
            ((x0 * (g1 * g1)) @ wm).t(),
        )


class PageClickGraph(_Parts):
    """Per click: the :data:`IMAGE_TENSORS`, ``point_coords`` ``1 x n x 2`` (model frame) and
    ``point_labels`` ``1 x n`` -> ``iou_predictions`` ``1 x 3`` and ``low_res_masks`` ``1 x 3 x 4h x 4w``
    (the three multimask candidates); with ``mask_prompt`` also the mask inputs (see :meth:`forward`).

    The low-rank factors are kept transposed, ``Z^T`` (``r x N``), so that every product and reduction
    over the image runs along its contiguous last axis."""

    def __init__(self, model, mask_prompt: bool = False) -> None:
        super().__init__(model)
        self.mask_prompt = bool(mask_prompt)
        dec = self.mask_decoder
        l1 = dec.transformer.layers[1]
        fin = dec.transformer.final_attn_token_to_image
        hp = self.heads_of
        with torch.no_grad():
            pe = self.pe_tokens
            # The positional encoding's projections after the first block (weights only: stored in the graph).
            self.register_buffer("pek1", hp(pe @ l1.cross_attn_token_to_image.k_proj.weight.t()).transpose(1, 2).contiguous())
            self.register_buffer("peq1", hp(F.linear(pe, l1.cross_attn_image_to_token.q_proj.weight,
                                                     l1.cross_attn_image_to_token.q_proj.bias)).transpose(1, 2).contiguous())
            self.register_buffer("pek2", hp(pe @ fin.k_proj.weight.t()).transpose(1, 2).contiguous())

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return SamOnnxDecoder._embed_points(self, coords, labels)

    def _token_values(self, attn, queries: torch.Tensor, tokens: torch.Tensor):
        """Image-to-token attention's token side: keys ``H x T x d`` (scaled), values ``H x T x d`` and the
        values through the output projection plus bias / H, ``(H T) x C`` rows (head-major)."""
        h, d = self.heads, self.d
        kk = self.heads_of(attn.k_proj(queries + tokens)) * (d ** -0.5)
        vv = self.heads_of(attn.v_proj(queries))
        wo = attn.out_proj.weight.view(self.dim, h, d).permute(1, 2, 0)  # H x d x C
        vo = torch.bmm(vv, wo) + attn.out_proj.bias / h  # H x T x C
        return kk, vv, vo.reshape(-1, self.dim)

    def _token_to_image(self, attn, q: torch.Tensor, kt: torch.Tensor, vh: torch.Tensor, a, pek, zt, m):
        """Token-to-image attention of ``T x C`` queries over ``a * X0 diag(G) + Z M`` plus the positional
        encoding: ``kt`` (``H x d x N``), ``vh`` (``H x N x d``) the per-image key and value projections of
        ``X0 diag(G)`` (with ``a`` None: ``a`` = 1 and the keys already include the encoding), ``pek`` the
        encoding's key projection, ``zt`` = ``Z^T`` (None: no low-rank part). Returns ``T x C`` (after the
        output projection)."""
        h, d = self.heads, self.d
        t = q.shape[0]
        qh = self.heads_of(attn.q_proj(q)) * (d ** -0.5)  # H x T x d
        logits = torch.bmm(qh, kt)  # H x T x N
        if a is not None:
            logits = logits * a + torch.bmm(qh, pek)
        if zt is not None:
            qk = torch.bmm(qh, attn.k_proj.weight.view(h, d, self.dim)).reshape(h * t, self.dim)  # (H T) x C
            logits = logits + ((qk @ m.t()) @ zt).reshape(h, t, -1)
        p = torch.softmax(logits, dim=-1)  # over the image axis, the last: ONNX's fused Softmax
        out = torch.bmm(p if a is None else p * a, vh)
        if zt is not None:
            pz = (p.reshape(h * t, -1) @ zt.t()).reshape(h, t, -1)  # H x T x r
            mv = torch.matmul(m, attn.v_proj.weight.view(h, d, self.dim).transpose(1, 2))  # H x r x d
            out = out + torch.bmm(pz, mv)
        out = out + attn.v_proj.bias.view(h, 1, d)
        return attn.out_proj(out.transpose(0, 1).reshape(t, h * d))

    @staticmethod
    def _gram_and_mean(m: torch.Tensor, zt: torch.Tensor):
        """``diag(Z M M^T Z^T)`` and ``Z M 1 / C`` (``N`` each) from one product with ``Z^T``."""
        r = m.shape[0]
        y = torch.cat([m @ m.t(), m.mean(-1, keepdim=True).t()], dim=0) @ zt  # (r + 1) x N
        return (y[:r] * zt).sum(0), y[r]

    def forward(self, *args: torch.Tensor):
        """``(*IMAGE_TENSORS[, *MASK_TENSORS], point_coords, point_labels[, mask_input, has_mask_input][,
        upscale_grid])``: the mask tensors and inputs with ``mask_prompt``. ``mask_input`` ``1 x 1 x 4h x
        4w`` low-res logits and ``has_mask_input`` ``1`` (1 to use them, 0 for none) as in the reference
        ONNX decoder. ``upscale_grid``: an ``R x C`` tensor (its values unused) whose shape says which image
        tokens to upscale, the top-left ``R x C`` of the ``h x w`` grid (the part of the model frame that
        holds the image, see :func:`upscale_grid`): the logits come out ``1 x 3 x 4R x 4C``, the same
        values as those rows and columns of the whole map. Without it, the whole grid."""
        kt0, vh0, qt0, xwo0, kt1, vh1, qt1, xwo0g, xwo1, kt2, vh2, base, stats = args[:13]
        rest = list(args[13:])
        xwm = xwmg = mask_input = has_mask = None
        if self.mask_prompt:
            xwm, xwmg = rest[:2]
            rest = rest[2:]
        point_coords, point_labels = rest[:2]
        rest = rest[2:]
        if self.mask_prompt:
            mask_input, has_mask = rest[:2]
            rest = rest[2:]
        grid = rest[0] if rest else None
        dec = self.mask_decoder
        l0, l1 = dec.transformer.layers
        h, c = self.heads, self.dim
        n = base.shape[0]
        sparse = self._embed_points(point_coords, point_labels)[0]
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, sparse], dim=0)  # T x C
        t = tokens.shape[0]

        # A mask prompt changes X0 by has * (hidden Wm^T + shift): a rank-m term and a constant row.
        ztm = mm = None
        if self.mask_prompt:
            pe = self.prompt_encoder
            conv = pe.mask_projection
            hidden = pe.mask_features(mask_input)[0].flatten(1) * has_mask  # m x N
            ztm = torch.cat([hidden, has_mask.reshape(1, 1).expand(1, n)], dim=0)  # (m + 1) x N
            mm = torch.cat([conv.weight.flatten(1).t(), (conv.bias - pe.no_mask_embed.weight[0]).unsqueeze(0)], dim=0)

        # Block 0: the image is X0 (plus the mask prompt's term).
        queries = l0.token_self_attention(tokens[None], tokens[None])[0]
        out = self._token_to_image(l0.cross_attn_token_to_image, queries + tokens, kt0, vh0, None, None, ztm, mm)
        queries = l0.norm2(queries + out)
        queries = l0.norm3(queries + l0.mlp(queries))
        attn = l0.cross_attn_image_to_token
        kk0, vv0, vo0 = self._token_values(attn, queries, tokens)
        logits = torch.bmm(kk0, qt0)
        if ztm is not None:
            qk = torch.bmm(kk0, attn.q_proj.weight.view(h, self.d, c)).reshape(h * t, c)
            logits = logits + ((qk @ mm.t()) @ ztm).reshape(h, t, n)
        p0 = _softmax_slabs(logits)  # H x T x N, over the tokens
        zt0 = p0.reshape(h * t, n)  # rows head-major like vo0's
        # norm4 statistics of S0 = X0 + Z0 m0 (the probabilities of each head sum to one over T).
        cross0 = (p0 * torch.bmm(vv0, xwo0)).sum((0, 1)) + stats[2]
        if ztm is not None:
            zt0 = torch.cat([ztm, zt0], dim=0)
            vo0 = torch.cat([mm, vo0], dim=0)
            cross0 = cross0 + (hidden * xwm).sum(0) + has_mask * stats[9]
        quad0, zmean0 = self._gram_and_mean(vo0, zt0)
        mean0 = stats[0] + zmean0
        ln0 = l0.norm4
        rstd0 = torch.rsqrt((stats[1] + 2 * cross0 + quad0) / c - mean0 * mean0 + ln0.eps)
        # X1 = a1 X0 diag(g0) + Z1 m1
        a1 = rstd0
        ones = torch.ones_like(mean0).unsqueeze(0)
        zt1 = torch.cat([zt0 * rstd0, (-mean0 * rstd0).unsqueeze(0), ones], dim=0)
        m1 = torch.cat([vo0 * ln0.weight, ln0.weight.unsqueeze(0), ln0.bias.unsqueeze(0)], dim=0)

        # Block 1.
        queries = l1.token_self_attention(queries[None], tokens[None])[0]
        out = self._token_to_image(l1.cross_attn_token_to_image, queries + tokens, kt1, vh1, a1, self.pek1, zt1, m1)
        queries = l1.norm2(queries + out)
        queries = l1.norm3(queries + l1.mlp(queries))
        attn = l1.cross_attn_image_to_token
        kk1, vv1, vo1 = self._token_values(attn, queries, tokens)
        qk = torch.bmm(kk1, attn.q_proj.weight.view(h, self.d, c)).reshape(h * t, c)  # queries' weights folded in
        low = ((qk @ m1.t()) @ zt1).reshape(h, t, n)
        p1 = _softmax_slabs(torch.bmm(kk1, qt1) * a1 + torch.bmm(kk1, self.peq1) + low)  # H x T x N
        # S1 = a1 X0 diag(g0) + Z2 m2 with Z2 = [Z1, probabilities], m2 = [m1; vo1].
        zt2 = torch.cat([zt1, p1.reshape(h * t, n)], dim=0)
        m2 = torch.cat([m1, vo1], dim=0)
        quad1, zmean1 = self._gram_and_mean(m2, zt2)
        mean1 = a1 * stats[3] / c + zmean1
        # X0 diag(g0) m2^T . Z2: the columns of Z1, then the probabilities'.
        own0 = (p0 * torch.bmm(vv0, xwo0g)).sum((0, 1)) + stats[5]
        if ztm is not None:
            own0 = own0 + (hidden * xwmg).sum(0) + has_mask * stats[10]
        cross1 = (rstd0 * own0 - mean0 * rstd0 * stats[6] + stats[7]
                  + (p1 * torch.bmm(vv1, xwo1)).sum((0, 1)) + stats[8])
        ln1 = l1.norm4
        rstd1 = torch.rsqrt((a1 * a1 * stats[4] + 2 * a1 * cross1 + quad1) / c - mean1 * mean1 + ln1.eps)
        a2 = a1 * rstd1
        zt3 = torch.cat([zt2 * rstd1, (-mean1 * rstd1).unsqueeze(0), ones], dim=0)
        m3 = torch.cat([m2 * ln1.weight, ln1.weight.unsqueeze(0), ln1.bias.unsqueeze(0)], dim=0)

        # Final attention for the IoU token and the three multimask tokens.
        tf = dec.transformer
        sel = [0] + [1 + i for i in range(1, dec.num_mask_tokens)]
        qs, ts = queries[sel], tokens[sel]
        out = self._token_to_image(tf.final_attn_token_to_image, qs + ts, kt2, vh2, a2, self.pek2, zt3, m3)
        final = tf.norm_final_attn(qs + out)
        iou = dec.iou_prediction_head(final[0])[1:].unsqueeze(0)
        mlps = dec.output_hypernetworks_mlps
        hyper = torch.stack([mlps[i](final[j + 1]) for j, i in enumerate(range(1, dec.num_mask_tokens))])  # 3 x c8

        # Upscaling: its first layer is a2 * (X0 diag(G) W1) + Z3 (m3 W1) + b1 per token.
        up1, ln, _, up2, _ = dec.output_upscaling
        w1, bias1, w2, bias2 = upscaling_products(dec.output_upscaling)
        c4, c8 = up1.out_channels, up2.out_channels
        hh, ww = self.size
        if grid is not None:  # only the tokens of the image's part of the model frame
            rows, cols = grid.shape
            r = zt3.shape[0]
            zt3 = zt3.reshape(r, hh, ww)[:, :rows, :cols].reshape(r, -1)
            base = base.reshape(hh, ww, -1)[:rows, :cols].reshape(-1, base.shape[-1])
            a2 = a2.reshape(hh, ww)[:rows, :cols].reshape(-1)
            hh, ww = rows, cols
        x = torch.addcmul(torch.addmm(bias1, zt3.t(), m3 @ w1), base, a2.unsqueeze(1))  # N x (a b c4)
        x = F.gelu(F.layer_norm(x.reshape(-1, c4), (c4,), ln.weight, ln.bias, ln.eps))
        x = F.gelu(torch.addmm(bias2, x, w2))  # (N a b) x (a2 b2 c8)
        masks = hyper @ x.reshape(-1, c8).t()  # 3 x (i j a b a2 b2)
        return iou, _pixel_shuffle(masks.unsqueeze(0), hh, ww)


def fuse_gelu(model) -> int:
    """Replace each GELU of the ONNX ``model`` (a ``ModelProto``; the five nodes
    ``x * 0.5 * (1 + erf(x / sqrt 2))`` that PyTorch exports) by onnxruntime's fused ``com.microsoft``
    ``FastGelu`` (the tanh form), in place, which onnxruntime-web runs faster in WebAssembly than the erf
    form. Returns how many were replaced."""
    from onnx import helper

    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name, op):
        """The single node reading ``name``, if it is an ``op``."""
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    dropped, fused = set(), {}
    for erf in (n for n in nodes if n.op_type == "Erf"):
        div = producer.get(erf.input[0])
        add = only(erf.output[0], "Add")
        mul = only(add.output[0], "Mul") if add is not None else None
        half = only(mul.output[0], "Mul") if mul is not None else None
        if div is None or div.op_type != "Div" or half is None or div.input[0] not in mul.input:
            continue
        dropped.update(id(n) for n in (div, erf, add, mul))
        fused[id(half)] = helper.make_node("FastGelu", [div.input[0]], list(half.output),
                                           name=half.name + "/fused_gelu", domain="com.microsoft")
    if fused:
        kept = [fused.get(id(n), n) for n in nodes if id(n) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def _prune(model) -> None:
    """Remove, in place, the nodes whose outputs nothing reads and the stored tensors no node reads
    (constants the trace left behind), which onnxruntime would otherwise warn about on every load, in the
    page's console too."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        kept = [n for n in graph.node if any(o in used for o in n.output)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    stored = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(stored)


def export_page_graphs(model, click_path, cache_path, mask_click_path=None, *, opset: int = 17,
                       quantize: bool = True) -> None:
    """Write the low-rank click graph for prompts without a mask prompt (:class:`PageClickGraph`) to
    ``click_path``, the one with the mask inputs to ``mask_click_path`` (when given), and the per-image
    graph (:class:`PageImageGraph`: outputs :data:`IMAGE_TENSORS` and :data:`MASK_TENSORS`) to
    ``cache_path``. With ``quantize`` (the page's approximate graphs) the click graphs' upscaling runs its
    second product in int8 (:func:`anyseg.export.quantize.quantize_upscaling`) and their GELUs in the tanh
    form (:func:`fuse_gelu`); without, they are the float32 decoder."""
    from pathlib import Path

    from ._common import FORMAT_VERSION, KIND_DECODER, KIND_DECODER_CACHE, META_FORMAT, META_IMG_SIZE, META_KIND, \
        META_OPSET, check_opset, export_graph, require_onnx
    from .decoder import example_decoder_inputs
    from .quantize import quantize_upscaling

    check_opset(opset)
    onnx = require_onnx()
    common = {META_FORMAT: FORMAT_VERSION, META_OPSET: str(opset), META_IMG_SIZE: str(int(model.img_size)),
              "anyseg.embedding_size": str(model.config.embedding_size), "anyseg.page_low_rank": "1"}
    image_graph = PageImageGraph(model)
    with torch.no_grad():
        example = example_decoder_inputs(model, num_points=2)
        export_graph(image_graph, example[:1], Path(cache_path), opset=opset, input_names=("image_embeddings",),
                     output_names=IMAGE_TENSORS + MASK_TENSORS, dynamic_axes={},
                     metadata={META_KIND: KIND_DECODER_CACHE, **common}, external_data=False)
        images = image_graph(example[0])
        targets = [(Path(click_path), False)] + ([] if mask_click_path is None else [(Path(mask_click_path), True)])
        for path, mask_prompt in targets:
            graph = PageClickGraph(model, mask_prompt=mask_prompt)
            inputs = IMAGE_TENSORS + (MASK_TENSORS if mask_prompt else ()) + ("point_coords", "point_labels")
            args = tuple(images[: len(IMAGE_TENSORS)]) + (tuple(images[len(IMAGE_TENSORS):]) if mask_prompt else ()) \
                + example[1:3]
            if mask_prompt:
                inputs += ("mask_input", "has_mask_input")
                args += example[3:5]
            grid = torch.zeros(graph.size[0] // 2 + 1, graph.size[1] - 1)  # any shape: traced as dynamic
            dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                       "upscale_grid": {0: "rows", 1: "cols"}, "low_res_masks": {2: "height", 3: "width"}}
            metadata = {META_KIND: KIND_DECODER, **common, "anyseg.image_cache": "1",
                        "anyseg.mask_prompt": str(int(mask_prompt)), "anyseg.multimask_only": "1",
                        "anyseg.upscale_masks": "0", "anyseg.num_masks": "3"}
            target = path.with_name(path.stem + "-float32.onnx") if quantize else path
            try:
                export_graph(graph, args + (grid,), target, opset=opset, input_names=inputs + ("upscale_grid",),
                             output_names=("iou_predictions", "low_res_masks"), dynamic_axes=dynamic,
                             metadata=metadata, external_data=False)
                if quantize:
                    quantize_upscaling(target, path)
                finished = onnx.load(str(path))
                # The upscaling's two GELUs, and the mask prompt's embedding's two.
                if quantize and fuse_gelu(finished) != (4 if mask_prompt else 2):
                    raise RuntimeError("the click graph's GELUs were not found to fuse")
                _prune(finished)
                onnx.save_model(finished, str(path))
            finally:
                if quantize and target.exists():
                    target.unlink()
