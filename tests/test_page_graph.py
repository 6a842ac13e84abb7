"""The labelling page's decoder graphs (anyseg/server/page_decoder.py), run with onnxruntime as the page
runs them with onnxruntime-web: the approximate graph's masks against the server's float32 decode on
every golden predictor case, and the exact graph one setting away."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import anyseg  # noqa: E402
from anyseg.geometry import boxes_to_model, coords_to_model  # noqa: E402
from anyseg.export.page_graph import (IMAGE_TENSORS, MASK_TENSORS, PageClickGraph, PageImageGraph,  # noqa: E402
                                      upscale_grid)
from anyseg.server.page_decoder import PAGE_GRAPH_KINDS, DecoderExport, SamPageGraphs  # noqa: E402
from conftest import mask_iou  # noqa: E402

pytestmark = pytest.mark.golden

MODELS = ["vit_small", "mobilesam"]


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prompts(case: dict):
    """Every single-object prompt of a golden case: ``(points, labels, box, uses_mask_input)``; the
    batched case gives one prompt per box."""
    if case["name"] == "batched_boxes":
        return [(None, None, box, False) for box in case["boxes"]]
    return [(case["point_coords"], case["point_labels"], case["box"], "mask_input" in case)]


def _page_feeds(points, labels, box, mask_input, original_size):
    """The decoder graph's prompt inputs as the page builds them (``OnnxDecoder.decode``)."""
    coords, codes = [], []
    if points:
        coords += coords_to_model(np.array(points, np.float64), original_size).tolist()
        codes += list(labels)
    if box is not None:
        coords += boxes_to_model(np.array(box, np.float64), original_size).reshape(2, 2).tolist()
        codes += [2, 3]
    else:
        coords.append([0.0, 0.0])  # the padding point
        codes.append(-1)
    has_mask = mask_input is not None
    return {"point_coords": np.array([coords], np.float32), "point_labels": np.array([codes], np.float32),
            "mask_input": (mask_input if has_mask else np.zeros((1, 256, 256), np.float32))[None].astype(np.float32),
            "has_mask_input": np.array([1.0 if has_mask else 0.0], np.float32)}


@pytest.fixture(scope="module", params=MODELS)
def page_graphs(request, manifest, golden_dir, tmp_path_factory):
    entry = manifest[request.param]
    model = anyseg.load_model(golden_dir / entry["checkpoint"], device="cpu")
    out = tmp_path_factory.mktemp(f"page-{request.param}")
    with torch.no_grad():
        SamPageGraphs.export(model, out / "decoder.onnx", out / "cache.onnx", "approximate", out / "nomask.onnx")
    return model, entry, _session(out / "decoder.onnx"), _session(out / "cache.onnx"), _session(out / "nomask.onnx")


@pytest.mark.slow
def test_approximate_graph_masks_match_the_float32_decode(page_graphs, golden_dir):
    """The three candidates the page shows, for every prompt of every golden predictor case (both
    images): mask IoU >= 0.98 against the server's float32 decode of the same prompt (multimask, as
    the page asks the server), scores within 1e-3. The graph for prompts without a mask prompt gives
    what the full graph gives for them."""
    model, entry, decoder, cache, nomask = page_graphs
    assert {i.name for i in nomask.get_inputs()} == set(IMAGE_TENSORS) | {"point_coords", "point_labels",
                                                                       "upscale_grid"}
    predictor = anyseg.SamPredictor(model)
    names = {i.name for i in decoder.get_inputs()}
    assert [o.name for o in decoder.get_outputs()] == ["iou_predictions", "low_res_masks"]
    worst, worst_nomask, checked = 1.0, 1.0, 0
    for spec in entry["predictor"]:
        golden = np.load(golden_dir / spec["file"])
        original = tuple(int(v) for v in golden["original_size"])
        input_size = tuple(int(v) for v in golden["input_size"])
        predictor.set_embedding(torch.from_numpy(golden["image_embedding"]), input_size, original)
        image = dict(zip((o.name for o in cache.get_outputs()),
                         cache.run(None, {"image_embeddings": golden["image_embedding"]})))
        for case in spec["cases"]:
            for points, labels, box, uses_mask in _prompts(case):
                mask_input = golden["refine_mask_input"] if uses_mask else None
                want, want_scores, _ = predictor.predict(
                    None if points is None else np.array(points), None if labels is None else np.array(labels),
                    None if box is None else np.array(box), mask_input=mask_input, multimask_output=True)
                feeds = {**image, **_page_feeds(points, labels, box, mask_input, original),
                         "upscale_grid": np.zeros((64, 64), np.float32)}
                scores, low = decoder.run(None, {k: v for k, v in feeds.items() if k in names})
                assert low.shape == (1, 3, 256, 256)
                if mask_input is None:
                    # The first click's graph (low-rank, float32 but its last upscaling product), asked for the
                    # image's tokens only as the page does, then for the whole map as the page does next.
                    rows, cols = upscale_grid(input_size, model.img_size, 64)
                    first = {i.name: feeds.get(i.name) for i in nomask.get_inputs()}
                    first["upscale_grid"] = np.zeros((rows, cols), np.float32)
                    _, part = nomask.run(None, first)
                    assert part.shape == (1, 3, 4 * rows, 4 * cols)
                    nomask_scores, nomask_low = nomask.run(None, {**first, "upscale_grid": np.zeros((64, 64), np.float32)})
                    assert nomask_low.shape == (1, 3, 256, 256)
                    # The same logits but for the int8 product's activation scale (taken over what is upscaled).
                    np.testing.assert_allclose(part, nomask_low[..., : 4 * rows, : 4 * cols], atol=0.25, rtol=0)
                    np.testing.assert_allclose(nomask_scores[0], want_scores, atol=1e-3, rtol=0)
                    # The shown masks (from the part, placed in the map) and the whole map's.
                    padded = np.full_like(nomask_low, -1e4)
                    padded[..., : 4 * rows, : 4 * cols] = part
                    for low_map in (padded, nomask_low):
                        got = model.postprocess_masks(torch.from_numpy(low_map), input_size, original)[0].numpy() > 0
                        worst_nomask = min([worst_nomask] + [mask_iou(a, b) for a, b in zip(got, want)])
                masks = model.postprocess_masks(torch.from_numpy(low), input_size, original)[0].numpy() > 0
                np.testing.assert_allclose(scores[0], want_scores, atol=1e-3, rtol=0)
                for got, ref in zip(masks, want):
                    worst = min(worst, mask_iou(got, ref))
                checked += 1
    print(f"\n{entry['checkpoint']}: approximate page graphs, worst mask IoU {worst:.4f} over {checked} prompts, "
          f"{worst_nomask:.4f} for the first-click graph")
    assert checked == 2 * 10
    assert worst >= 0.98 and worst_nomask >= 0.98


def test_low_rank_click_graph_is_the_decoder(manifest, golden_dir):
    """The low-rank click graphs' function in PyTorch (before export) against the mask decoder on a golden
    image embedding: one click, several clicks, a box, each without and with a mask prompt; logits to
    float32 rounding."""
    model = anyseg.load_model(golden_dir / manifest["mobilesam"]["checkpoint"], device="cpu")
    golden = np.load(golden_dir / manifest["mobilesam"]["predictor"][0]["file"])
    emb = torch.from_numpy(golden["image_embedding"].astype(np.float32))
    images, click, refine = PageImageGraph(model), PageClickGraph(model), PageClickGraph(model, mask_prompt=True)
    mask_input = torch.from_numpy(golden["refine_mask_input"].astype(np.float32)).reshape(1, 1, 256, 256)
    prompts = [([[500.0, 300.0]], [1]), ([[500.0, 300.0], [200.0, 700.0], [900.0, 100.0]], [1, 0, 1])]
    with torch.no_grad():
        tensors = images(emb)
        plain = tensors[: len(IMAGE_TENSORS)]
        for points, labels in prompts + [(None, None)]:
            if points is None:  # a box: its two corners
                coords, codes = torch.tensor([[[100.0, 200.0], [600.0, 900.0]]]), torch.tensor([[2.0, 3.0]])
                sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor([[100.0, 200.0, 600.0, 900.0]]),
                                                     masks=None)
            else:
                coords = torch.tensor([points + [[0.0, 0.0]]])
                codes = torch.tensor([labels + [-1]], dtype=torch.float32)
                sparse, dense = model.prompt_encoder(points=(coords[:, :-1], codes[:, :-1]), boxes=None, masks=None)
            iou, low = click(*plain, coords, codes)
            want_low, want_iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense,
                                                    multimask_output=True)
            assert low.shape == want_low.shape == (1, 3, 256, 256)
            torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=0)
            torch.testing.assert_close(low, want_low, atol=1e-4, rtol=1e-4)
            # Upscaling part of the image tokens gives those rows and columns of the map, in float32 exactly.
            _, part = click(*plain, coords, codes, torch.zeros(43, 61))
            assert torch.equal(part, low[..., :172, :244])
            # The graph with the mask inputs: without a mask (has_mask_input 0) the same, with one the
            # decoder's answer to the mask prompt.
            iou0, low0 = refine(*tensors, coords, codes, mask_input, torch.tensor([0.0]))
            torch.testing.assert_close(low0, want_low, atol=1e-4, rtol=1e-4)
            iou1, low1 = refine(*tensors, coords, codes, mask_input, torch.tensor([1.0]))
            dense = model.prompt_encoder.embed_masks(mask_input)
            want_low, want_iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense,
                                                    multimask_output=True)
            torch.testing.assert_close(iou1, want_iou, atol=1e-5, rtol=0)
            torch.testing.assert_close(low1, want_low, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_page_graph_setting(golden_dir, tmp_path):
    """``exact`` gives the float32 graph with all four outputs, matching the decoder; the default is the
    approximate graph (three outputs, int8 upscaling products); an unknown kind is refused."""
    import onnx

    assert PAGE_GRAPH_KINDS == ("approximate", "exact")
    model = anyseg.load_model(golden_dir / "mobilesam_checkpoint.pth", device="cpu")
    with pytest.raises(ValueError, match="approximate, exact"):
        DecoderExport(model, tmp_path, graph="int4")
    exact = DecoderExport(model, tmp_path, graph="exact")
    assert exact.wait(timeout=600) == "ready", exact.reason
    graph = onnx.load(str(exact.path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["anyseg.num_masks"] == "4" and meta["anyseg.multimask_only"] == "0"
    assert "anyseg.quantized" not in meta
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in graph.graph.node)
    assert exact.describe(model)["outputs"]["low_res_masks"].startswith("1x4x")
    assert {i.name for i in _session(exact.nomask_path).get_inputs()} == {
        "image_keys", "image_key_proj", "image_value_proj", "image_query_proj", "point_coords", "point_labels"}
    # The exact graph's logits are the decoder's to float32 rounding.
    predictor = anyseg.SamPredictor(model)
    golden = np.load(golden_dir / "mobilesam_dog_predictor.npz")
    original = tuple(int(v) for v in golden["original_size"])
    predictor.set_embedding(torch.from_numpy(golden["image_embedding"]),
                            tuple(int(v) for v in golden["input_size"]), original)
    _, want_scores, want_low = predictor.predict(np.array([[400.0, 267.0]]), np.array([1]), multimask_output=True)
    cache = _session(exact.cache_path)
    decoder = _session(exact.path)
    image = dict(zip((o.name for o in cache.get_outputs()), cache.run(None, {"image_embeddings": golden["image_embedding"]})))
    scores, low = decoder.run(None, {**image, **_page_feeds([[400.0, 267.0]], [1], None, None, original)})
    np.testing.assert_allclose(scores[0, 1:], want_scores, atol=1e-3, rtol=0)
    np.testing.assert_allclose(low[0, 1:], want_low, atol=1e-2, rtol=0)

    approximate = DecoderExport(model, tmp_path)  # the default
    assert approximate.graph == "approximate" and approximate.path != exact.path
    assert approximate.wait(timeout=600) == "ready", approximate.reason
    graph = onnx.load(str(approximate.path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["anyseg.num_masks"] == "3" and meta["anyseg.quantized"] == "int8-upscaling"
    # Low-rank with the mask inputs: the upscaling's second product in int8, all its GELUs fused.
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("FastGelu") == 4 and "Erf" not in ops
    assert {i.name for i in graph.graph.input} == set(IMAGE_TENSORS) | set(MASK_TENSORS) | {
        "point_coords", "point_labels", "mask_input", "has_mask_input", "upscale_grid"}
    assert approximate.nomask_path.is_file() and approximate.nomask_path != exact.nomask_path
    # The first click's graph: low-rank, the upscaling's second product in int8, its GELUs fused in tanh form.
    first = onnx.load(str(approximate.nomask_path))
    ops = [n.op_type for n in first.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("FastGelu") == 2 and "Erf" not in ops
    assert {i.name for i in first.graph.input} == set(IMAGE_TENSORS) | {"point_coords", "point_labels", "upscale_grid"}
    described = approximate.describe(model)
    assert described["outputs"]["low_res_masks"].startswith("1x3x")
    assert set(described["nomask_inputs"]) == {i.name for i in first.graph.input}
    assert set(described["inputs"]) == {i.name for i in graph.graph.input}
    assert set(exact.describe(model)["nomask_inputs"]) == {i.name for i in _session(exact.nomask_path).get_inputs()}


UPSCALE_JS = """
import { readFileSync, writeFileSync } from 'node:fs';
const { upscaleLogits } = await import(process.argv[2]);
const [side, imgSize, inputH, inputW, H, W, count] = JSON.parse(process.argv[3]);
const all = new Float32Array(readFileSync(process.argv[4]).buffer.slice(0));
const out = new Uint8Array(count * H * W);
for (let i = 0; i < count; i++) {
  out.set(upscaleLogits(all.subarray(i * side * side, (i + 1) * side * side), side, imgSize, inputH, inputW, H, W), i * H * W);
}
writeFileSync(process.argv[5], out);
"""


@pytest.mark.parametrize("size", [(534, 800), (800, 534), (37, 53), (1500, 1500)])
def test_page_upscale_of_the_positive_region_only(tmp_path, size):
    """static/masks.js computes only the pixels near positive low-res logits, and fills the pixels whose
    taps all have one sign without mixing them: its masks equal the model's postprocessing of the whole
    map (bilinear to 1024, crop, bilinear to H x W, > 0), for landscape, portrait, tiny and large images."""
    import shutil
    import subprocess

    from anyseg.geometry import resized_shape
    from anyseg.server import page_decoder

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    masks_js = (page_decoder.__file__.rsplit("/", 1)[0]) + "/static/masks.js"
    side, img_size, (h, w) = 256, 1024, size
    input_h, input_w = resized_shape(h, w, img_size)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    maps = [np.full((side, side), -5.0), np.full((side, side), 3.0), rng.normal(0, 1, (side, side))]
    for cy, cx, r in ((100, 60, 20), (0, 0, 9), (170, 255, 30), (128, 128, 1.5), (250, 5, 4)):
        maps.append(r - np.hypot(yy - cy, xx - cx) + 0.3 * rng.normal(size=(side, side)))
    # Past the image's bottom or right edge (the padding of the model frame): nothing shows.
    padded = input_h < img_size or input_w < img_size
    if padded:
        maps.append(np.where((yy > input_h // 4 + 2) | (xx > input_w // 4 + 2), 4.0, -4.0))
    logits = np.stack(maps).astype(np.float32)
    (tmp_path / "run.mjs").write_text(UPSCALE_JS)
    (tmp_path / "logits.bin").write_bytes(logits.tobytes())
    args = [side, img_size, input_h, input_w, h, w, len(maps)]
    subprocess.run([node, str(tmp_path / "run.mjs"), "file://" + masks_js, str(args).replace(" ", ""),
                    str(tmp_path / "logits.bin"), str(tmp_path / "masks.bin")], check=True, timeout=120)
    got = np.frombuffer((tmp_path / "masks.bin").read_bytes(), np.uint8).reshape(len(maps), h, w)
    up = F.interpolate(torch.from_numpy(logits)[None], (img_size, img_size), mode="bilinear", align_corners=False)
    want = F.interpolate(up[..., :input_h, :input_w], (h, w), mode="bilinear", align_corners=False)[0].numpy() > 0
    assert not got[0].any() and got[1].all()
    assert not padded or (not got[-1].any() and not want[-1].any())
    for i in range(len(maps)):
        # float32 sums in another order: a pixel whose value is within rounding of 0 may differ (the noise
        # map has many such pixels: a few per million)
        assert (got[i].astype(bool) != want[i]).sum() <= max(2, h * w // 500_000), i
