"""The decoder graphs that let the page decode clicks itself (onnxruntime-web), per model family.

:class:`DecoderExport` exports them once in the background and caches them on disk; ``GET
/api/v1/decoder`` reports its status and the graphs' inputs. What a family's graphs are is described by
one entry of :data:`PAGE_GRAPHS`; a family without an entry has no in-page decoding, the status says so
and the page decodes on the server (``static/decoders.js``, ``chooseDecoder``). An entry needs both an
ONNX export (:mod:`anyseg.export`) and the page's side of it (``OnnxDecoder`` in ``static/decoders.js``,
which maps clicks into the model frame and upscales the low-res logits as the family's postprocessing
does): SAM 1 has both; SAM 2 has neither yet.

Two kinds of decoder graph (:data:`PAGE_GRAPH_KINDS`, ``anyseg serve --page-graph``): ``approximate``
(the default) is faster in the page and its masks stay within mask IoU 0.98 of the server's float32
decode; ``exact`` is the float32 decoder computation.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Dict, Optional

import torch

from ..protocol import FAMILY_NAMES, model_family

log = logging.getLogger("anyseg.server")

DECODER_OPSET = 17
#: The kinds of page decoder graph: ``approximate`` (the default: the three candidates the page shows only,
#: the upscaling network's two products in int8) and ``exact`` (float32, all four outputs).
PAGE_GRAPH_KINDS = ("approximate", "exact")
#: Changes when the graphs' inputs or computation change (2: the low-rank graphs with upscale_grid).
PAGE_GRAPHS_VERSION = 2


class SamPageGraphs:
    """SAM 1's page graphs: a per-image graph, which the page runs once per image, and per-click graphs
    that take its outputs and stop at the low-res logits (the page upscales the candidates itself,
    ``static/masks.js``, ``upscaleLogits``): one with the mask inputs, and one for prompts without a mask
    prompt (the page's first click on an object), the same function with less work.

    ``approximate``: the low-rank graphs of :mod:`anyseg.export.page_graph` (:func:`export_page_graphs`),
    the three multimask candidates only (the page never shows the single-mask output), float32 except
    the upscaling's second product in int8 and its GELUs in tanh form, upscaling the image tokens the
    page asks for (``upscale_grid``). A decoder without two two-way blocks gets the graphs below with
    ``multimask_only`` and both upscaling products in int8
    (:func:`anyseg.export.quantize.quantize_upscaling`). ``exact``: ``export_decoder_cache`` and
    ``export_decoder(fast=True, upscale_masks=False, image_cache=True)``, float32, all four outputs."""

    @staticmethod
    def key(model) -> str:
        """A hash of the prompt encoder and mask decoder weights (and the opset, the input size and the
        version of the graphs' design, so that graphs cached on disk by an earlier release are not reused)."""
        digest = hashlib.sha256(f"opset{DECODER_OPSET}/graphs{PAGE_GRAPHS_VERSION}".encode())
        state = {**{f"p.{k}": v for k, v in model.prompt_encoder.state_dict().items()},
                 **{f"d.{k}": v for k, v in model.mask_decoder.state_dict().items()}}
        for key in sorted(state):
            tensor = state[key].detach().to("cpu", torch.float32).contiguous()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
        digest.update(str(getattr(model, "img_size", "")).encode())
        return digest.hexdigest()

    @staticmethod
    def export(snapshot, decoder_path: Path, cache_path: Path, graph: str = "approximate",
               nomask_path: Optional[Path] = None) -> None:
        """Write the decoder graph of kind ``graph``, the per-image graph and (given ``nomask_path``) the
        decoder graph for prompts without a mask prompt."""
        from ..export import export_decoder, export_decoder_cache, page_graph  # ImportError without the onnx extra

        options = dict(opset=DECODER_OPSET, fast=True, upscale_masks=False, image_cache=True)
        low_rank = graph == "approximate" and nomask_path is not None and page_graph.supported(snapshot)
        if low_rank:
            # The low-rank graphs, with and without the mask inputs, and their per-image graph.
            page_graph.export_page_graphs(snapshot, nomask_path, cache_path, decoder_path, opset=DECODER_OPSET)
            return
        targets = [(decoder_path, True)] + ([] if nomask_path is None else [(nomask_path, False)])
        for path, mask_prompt in targets:
            if graph == "exact":
                export_decoder(snapshot, path, mask_prompt=mask_prompt, **options)
                continue
            from ..export.quantize import quantize_upscaling

            plain = path.with_name(path.stem + "-float32.onnx")
            try:
                export_decoder(snapshot, plain, multimask_only=True, mask_prompt=mask_prompt, **options)
                quantize_upscaling(plain, path)
            finally:
                if plain.exists():
                    plain.unlink()
        export_decoder_cache(snapshot, cache_path, opset=DECODER_OPSET)

    @staticmethod
    def describe(model, graph: str = "approximate") -> Dict[str, Dict[str, str]]:
        """Input and output names and shapes of the graphs (``cache_inputs``, ``inputs``, ``nomask_inputs``,
        ``outputs``)."""
        from ..export import page_graph

        g = model.prompt_encoder.image_embedding_size
        side = model.prompt_encoder.mask_input_size[0]
        dim = model.prompt_encoder.embed_dim
        k = model.mask_decoder.num_mask_tokens - (1 if graph == "approximate" else 0)
        n = int(g[0]) * int(g[1])
        first = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
        h = first.num_heads
        d = first.q_proj.out_features // h
        inputs = {"image_keys": f"1x{n}x{dim} (from the per-image graph)",
                  "image_key_proj": f"1x{h}x{n}x{d} (from the per-image graph)",
                  "image_value_proj": f"1x{h}x{n}x{d} (from the per-image graph)",
                  "image_query_proj": f"1x{n}x{h * d} (from the per-image graph)",
                  "point_coords": "1xNx2 (model frame)", "point_labels": "1xN",
                  "mask_input": f"1x1x{side}x{side}", "has_mask_input": "1"}
        nomask = {k: v for k, v in inputs.items() if k not in ("mask_input", "has_mask_input")}
        if graph == "approximate" and page_graph.supported(model):
            tensors = {name: "(from the per-image graph)" for name in page_graph.IMAGE_TENSORS}
            prompts = {"point_coords": "1xNx2 (model frame)", "point_labels": "1xN"}
            grid = {"upscale_grid": f"RxC, R, C <= {g[0]}, {g[1]}: upscale the top-left R x C image tokens "
                                    "(low_res_masks then 1x3x4Rx4C)"}
            nomask = {**tensors, **prompts, **grid}
            inputs = {**tensors, **{name: "(from the per-image graph)" for name in page_graph.MASK_TENSORS}, **prompts,
                      "mask_input": f"1x1x{side}x{side}", "has_mask_input": "1", **grid}
        return {
            "cache_inputs": {"image_embeddings": f"1x{dim}x{g[0]}x{g[1]}"},
            "inputs": inputs,
            "nomask_inputs": nomask,
            "outputs": {"iou_predictions": f"1x{k}", "low_res_masks": f"1x{k}x{side}x{side} (upscaled by the page)"},
        }


#: The page graphs of each model family that has them.
PAGE_GRAPHS = {"sam": SamPageGraphs}


class DecoderExport:
    """The model's decoder as ONNX graphs for the browser, exported once in the background.

    ``status`` is ``"exporting"``, ``"ready"`` (``path``, ``nomask_path`` and ``cache_path`` are the files) or
    ``"unavailable"`` (``reason`` says why; the page then decodes on the server). Graphs are cached on
    disk by a hash of the decoder's weights, so a restart reuses the files. ``graph`` is one of
    :data:`PAGE_GRAPH_KINDS`.
    """

    def __init__(self, model, directory: Optional[Path], enabled: bool = True, graph: str = "approximate") -> None:
        if graph not in PAGE_GRAPH_KINDS:
            raise ValueError(f"the page graph must be one of {', '.join(PAGE_GRAPH_KINDS)}, got {graph!r}")
        self.graph = graph
        self.status = "unavailable"
        self.reason = "the browser decoder is disabled (--no-browser-decoder)"
        self.path: Optional[Path] = None
        self.nomask_path: Optional[Path] = None
        self.cache_path: Optional[Path] = None
        self._thread: Optional[threading.Thread] = None
        family = model_family(model)
        self.graphs = PAGE_GRAPHS.get(family)
        if not enabled:
            return
        if self.graphs is None:
            self.reason = (f"in-page decoding is not available for {FAMILY_NAMES[family]} models (no "
                           "browser decoder graph for this model family yet): clicks are decoded on the server")
            return
        if directory is None:
            from ..hub import cache_dir

            directory = cache_dir() / "onnx"
        self.directory = Path(directory)
        stem = f"decoder-{self.graphs.key(model)[:20]}-opset{DECODER_OPSET}"
        kind = "fast-lowres-cached" if graph == "exact" else "page-approximate"
        self.target = self.directory / f"{stem}-{kind}.onnx"
        self.cache_target = self.directory / f"{stem}-image-cache.onnx"
        self.nomask_target = self.directory / f"{stem}-{kind}-nomask.onnx"
        if self.target.is_file() and self.cache_target.is_file() and self.nomask_target.is_file():
            self.status, self.reason = "ready", ""
            self.path, self.cache_path, self.nomask_path = self.target, self.cache_target, self.nomask_target
            return
        self.status, self.reason = "exporting", "the decoder graph is being exported"
        # Export a CPU float32 copy, so that serving goes on with the original meanwhile.
        with torch.no_grad():
            snapshot = copy.deepcopy(model).to("cpu", torch.float32).eval()
        self._thread = threading.Thread(target=self._run, args=(snapshot,), name="anyseg-decoder-export", daemon=True)
        self._thread.start()

    def describe(self, model) -> Dict[str, Dict[str, str]]:
        """The graphs' input and output names and shapes (empty for a family without page graphs)."""
        if self.graphs is None:
            return {"cache_inputs": {}, "inputs": {}, "nomask_inputs": {}, "outputs": {}}
        return self.graphs.describe(model, self.graph)

    def wait(self, timeout: Optional[float] = None) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    def _run(self, snapshot) -> None:
        tag = f".tmp-{os.getpid()}-{threading.get_ident()}-"
        tmp, cache_tmp, nomask_tmp = (t.with_name(tag + t.name)
                                      for t in (self.target, self.cache_target, self.nomask_target))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.graphs.export(snapshot, tmp, cache_tmp, self.graph, nomask_tmp)
            # The other graphs go into place first: a decoder graph on disk means all three are there.
            os.replace(cache_tmp, self.cache_target)
            os.replace(nomask_tmp, self.nomask_target)
            os.replace(tmp, self.target)
            self.path, self.cache_path, self.nomask_path = self.target, self.cache_target, self.nomask_target
            self.status, self.reason = "ready", ""
            log.info("decoder graphs exported to %s", self.target.parent)
        except ImportError as exc:
            self.status, self.reason = "unavailable", f"ONNX export is not available ({exc}); install anyseg[onnx]"
        except Exception as exc:  # any failure leaves server-side decoding in place
            log.warning("decoder export failed: %s", exc)
            self.status, self.reason = "unavailable", f"decoder export failed: {type(exc).__name__}: {exc}"
        finally:
            for t in (tmp, cache_tmp, nomask_tmp):
                if t.exists():
                    t.unlink()
