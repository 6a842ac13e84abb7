"""HQ-SAM as ONNX graphs: the encoder graph with the early-feature output and the HQ decoder graph against
SamPredictor on the golden HQ models, the torch-free runtime (in a process where torch cannot be imported),
the graphs' interface, family detection, options and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs the onnx extra (pip install 'anyseg[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra (pip install 'anyseg[onnx]')")

import torch  # noqa: E402
from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks  # noqa: E402

import anyseg  # noqa: E402
from anyseg import SamPredictor  # noqa: E402
from anyseg.export import HQ_DECODER_INPUTS, HQ_ENCODER_OUTPUTS, export_decoder, export_encoder  # noqa: E402
from anyseg.runtime import GraphError, OnnxPredictor, open_graph  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HQ = GOLDEN / "hq"
CPU = ["CPUExecutionProvider"]

BLOCK_TORCH = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process: " + name)
            return None

    sys.meta_path.insert(0, _NoTorch())
""")

# Runs the golden predict cases of one image with OnnxPredictor and saves what it returns.
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable: the blocker did not work")
    from anyseg.runtime import OnnxPredictor

    job = json.loads(open(sys.argv[1]).read())
    pred = OnnxPredictor(job["encoder"], job["decoder"], providers=["CPUExecutionProvider"])
    assert pred.family == "sam_hq", pred.family
    pred.set_image(job["image"])
    out = {"embedding": pred.get_image_embedding(), "interm": pred.get_interm_embeddings()}
    mask_input = np.load(job["mask_input"])
    for name, kw in job["cases"].items():
        kw = dict(kw)
        if kw.pop("mask_input", False):
            kw["mask_input"] = mask_input
        masks, scores, low = pred.predict(**kw)
        out[name + "_masks"], out[name + "_scores"], out[name + "_low_res"] = masks, scores, low
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    if loaded:
        raise SystemExit(f"torch modules were loaded: {loaded}")
    np.savez(job["out"], **out)
""")


def _compose(name: str, folder: Path) -> Path:
    """The full HQ checkpoint of golden model ``name`` (golden/hq/README.md)."""
    manifest = json.loads((_require(HQ) / "manifest.json").read_text())
    sd = torch.load(HQ / manifest[name]["base_checkpoint"], weights_only=True)
    sd.update(torch.load(HQ / manifest[name]["extra_checkpoint"], weights_only=True))
    path = folder / f"sam_hq_{name}.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def manifest():
    return json.loads((_require(HQ) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _compose("vit_small", tmp_path_factory.mktemp("hq_ckpt"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return anyseg.load_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hq_onnx")
    return dict(out=out, encoder=export_encoder(model, out / "encoder.onnx"),
                decoder=export_decoder(model, out / "decoder.onnx"))


@pytest.fixture(scope="module")
def dog(graphs, model):
    """(OnnxPredictor, SamPredictor), both with dog.jpg set (shared: encoding takes seconds)."""
    pred = OnnxPredictor(graphs["encoder"], graphs["decoder"], providers=CPU)
    pred.set_image(IMAGES / "dog.jpg")
    ref = SamPredictor(model)
    ref.set_image(IMAGES / "dog.jpg")
    return pred, ref


def _predict_kwargs(case: dict) -> dict:
    """The golden case's ``predict`` arguments as JSON-able values (``mask_input``: a flag)."""
    kw = {}
    if case.get("point_coords") is not None:
        kw["point_coords"] = case["point_coords"]
        kw["point_labels"] = case["point_labels"]
    if case.get("box") is not None:
        kw["box"] = case["box"]
    if "mask_input" in case:
        kw["mask_input"] = True
    if case["name"] != "default_args":
        kw["multimask_output"] = case["multimask_output"]
        kw["hq_token_only"] = case["hq_token_only"]
    return kw


def _torch_kwargs(kw: dict, mask_input: np.ndarray) -> dict:
    out = dict(kw)
    if "point_coords" in out:
        out["point_coords"] = np.array(out["point_coords"], dtype=np.float32)
        out["point_labels"] = np.array(out["point_labels"])
    if "box" in out:
        out["box"] = np.array(out["box"], dtype=np.float32)
    if out.pop("mask_input", False):
        out["mask_input"] = mask_input
    return out


def _compare(name, got, want, h, w):
    """ONNX (masks, scores, low-res) against the torch predictor's: logits within 1e-3 relative, IoU within
    1e-4, masks IoU >= 0.999. Returns (max relative low-res error, min mask IoU)."""
    g_masks, g_iou, g_low = got
    masks, iou, low = want
    assert g_masks.shape == masks.shape and g_low.shape == low.shape == (1, 256, 256), name
    rel = np.abs(g_low - low).max() / max(1.0, np.abs(low).max())
    assert rel <= 1e-3, name
    np.testing.assert_allclose(g_iou, iou, atol=1e-4, rtol=0, err_msg=name)
    if g_masks.dtype != bool:  # return_logits
        assert np.abs(g_masks - masks).max() <= 1e-3 * max(1.0, np.abs(masks).max()), name
        g_masks, masks = g_masks > 0, masks > 0
    ious = [mask_iou(a, b) for a, b in zip(g_masks.reshape(-1, h, w), masks.reshape(-1, h, w))]
    assert min(ious) >= 0.999, name
    print(f"{name}: low-res max rel err {rel:.2e}, score err {np.abs(g_iou - iou).max():.1e}, mask IoU {min(ious):.6f}")
    return rel, min(ious)


def test_graph_interface(graphs, model):
    enc = ort.InferenceSession(str(graphs["encoder"]), providers=CPU)
    dec = ort.InferenceSession(str(graphs["decoder"]), providers=CPU)
    assert [o.name for o in enc.get_outputs()] == list(HQ_ENCODER_OUTPUTS)
    assert [i.name for i in dec.get_inputs()] == list(HQ_DECODER_INPUTS)
    assert [o.name for o in dec.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    interm = {i.name: i.shape for i in dec.get_inputs()}["interm_embeddings"]
    assert interm == [1, 64, 64, model.mask_decoder.vit_dim] == [1, 64, 64, 96]
    meta_e = enc.get_modelmeta().custom_metadata_map
    meta_d = dec.get_modelmeta().custom_metadata_map
    assert meta_e["anyseg.family"] == meta_d["anyseg.family"] == "sam_hq"
    assert meta_d["anyseg.num_masks"] == "2" and meta_d["anyseg.hq_vit_dim"] == "96"


@pytest.mark.slow
def test_encoder_graph_batch(graphs):
    """Dynamic batch: the second of two images gives its single-image outputs."""
    enc = ort.InferenceSession(str(graphs["encoder"]), providers=CPU)
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 1024, 768)).astype(np.float32)
    emb, feat = enc.run(None, {"image": x})
    assert emb.shape == (2, 256, 64, 64) and feat.shape == (2, 64, 64, 96)
    single = enc.run(None, {"image": x[1:]})
    assert np.abs(emb[1:] - single[0]).max() <= 1e-4 and np.abs(feat[1:] - single[1]).max() <= 1e-4


def test_parity_with_predictor(dog, manifest):
    """Every golden predict case on dog.jpg (HQ and not, single and multimask, box, mask input): the ONNX
    pair against SamPredictor, plus the golden data within its README's tolerances."""
    entry = next(e for e in manifest["vit_small"]["predictor"] if e["image"] == "dog.jpg")
    golden = np.load(HQ / entry["file"])
    h, w = entry["image_hw"]
    pred, ref = dog
    assert np.abs(pred.get_image_embedding() - ref.get_image_embedding().numpy()).max() <= 1e-4
    assert np.abs(pred.get_interm_embeddings() - ref.interm_features.numpy()).max() <= 1e-4
    mask_input = golden["refine_mask_input"].astype(np.float32) if "refine_mask_input" in golden.files else None
    seen = 0
    for case in entry["cases"]:
        if case["call"] != "predict" or ("mask_input" in case and mask_input is None):
            continue
        kw = _torch_kwargs(_predict_kwargs(case), mask_input)
        got = pred.predict(**kw)
        want = ref.predict(**kw)
        _compare(case["name"], got, tuple(np.asarray(v) for v in want), h, w)
        name = case["name"]
        want_masks = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
        assert mask_iou(got[0][0], want_masks.reshape(-1, h, w)[0]) >= 0.999, name
        g_ref = golden[f"{name}_low_res_logits"].astype(np.float32).reshape(got[2].shape)
        assert (np.abs(got[2] - g_ref) <= 1e-2 + 2e-3 * np.abs(g_ref)).all(), name
        assert np.abs(got[1] - golden[f"{name}_iou"]).max() <= 1e-3, name
        seen += 1
    assert seen >= 4


@pytest.mark.slow
def test_return_logits_and_both_modes(graphs, model):
    """Full-size logits for all four (multimask_output, hq_token_only) settings of one click on truck."""
    pred = OnnxPredictor(graphs["encoder"], graphs["decoder"], providers=CPU)
    pred.set_image(IMAGES / "truck.jpg")
    ref = SamPredictor(model)
    ref.set_image(IMAGES / "truck.jpg")
    outs = {}
    for multi in (True, False):
        for hq in (False, True):
            kw = dict(point_coords=np.array([[900.0, 600.0]], np.float32), point_labels=np.array([1]),
                      multimask_output=multi, hq_token_only=hq, return_logits=True)
            got = pred.predict(**kw)
            _compare(f"multi={multi} hq={hq}", got, tuple(np.asarray(v) for v in ref.predict(**kw)), 1200, 1800)
            outs[multi, hq] = got
    # The HQ-only logits do not depend on the mode; the score is the selected SAM token's in both.
    np.testing.assert_array_equal(outs[True, True][2], outs[False, True][2])
    np.testing.assert_array_equal(outs[True, True][1], outs[True, False][1])


def test_runtime_without_torch(graphs, model, manifest, tmp_path):
    """OnnxPredictor in a process that cannot import torch, on truck.jpg's golden cases, against SamPredictor
    (logits within 1e-3 relative, masks IoU >= 0.999) and the golden data."""
    entry = next(e for e in manifest["vit_small"]["predictor"] if e["image"] == "truck.jpg")
    golden = np.load(HQ / entry["file"])
    h, w = entry["image_hw"]
    wanted = ("point_multi", "point_single_hq", "box_and_points_multi_hq", "refine_hq", "default_args")
    cases = {c["name"]: _predict_kwargs(c) for c in entry["cases"] if c["name"] in wanted}
    assert set(cases) == set(wanted)
    block = tmp_path / "block_torch"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_TORCH)
    (tmp_path / "child.py").write_text(CHILD)
    mask_input = golden["refine_mask_input"].astype(np.float32)
    np.save(tmp_path / "mask_input.npy", mask_input)
    job = dict(encoder=str(graphs["encoder"]), decoder=str(graphs["decoder"]), image=str(IMAGES / "truck.jpg"),
               mask_input=str(tmp_path / "mask_input.npy"), cases=cases, out=str(tmp_path / "got.npz"))
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "job.json")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")

    ref = SamPredictor(model)
    ref.set_image(IMAGES / "truck.jpg")
    assert np.abs(got["embedding"] - ref.get_image_embedding().numpy()).max() <= 1e-4
    assert np.abs(got["interm"] - ref.interm_features.numpy()).max() <= 1e-4
    ref_corner = golden["interm_embedding_corner"].astype(np.float32)
    assert (np.abs(got["interm"][:, :32, :32] - ref_corner) <= 1e-2 + 2e-3 * np.abs(ref_corner)).all()
    for name, kw in cases.items():
        g = (got[name + "_masks"], got[name + "_scores"], got[name + "_low_res"])
        want = ref.predict(**_torch_kwargs(kw, mask_input))
        _compare(name, g, tuple(np.asarray(v) for v in want), h, w)
        want_masks = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
        assert mask_iou(g[0][0], want_masks.reshape(-1, h, w)[0]) >= 0.999, name
        assert np.abs(g[1] - golden[f"{name}_iou"]).max() <= 1e-3, name


def test_decoder_only_and_errors(graphs, dog):
    full = dog[0]
    pred = OnnxPredictor(None, graphs["decoder"], providers=CPU)
    assert pred.family == "sam_hq"
    with pytest.raises(ValueError, match="interm_embeddings"):
        pred.set_image_embedding(full.get_image_embedding(), (534, 800))
    with pytest.raises(ValueError, match="SAM 2"):
        pred.set_image_embedding(full.get_image_embedding(), (534, 800), high_res_feats=(1, 2))
    with pytest.raises(ValueError, match="shape"):
        pred.set_image_embedding(full.get_image_embedding(), (534, 800),
                                 interm_embeddings=np.zeros((1, 64, 64, 160), np.float32))
    pred.set_image_embedding(full.get_image_embedding(), (534, 800), interm_embeddings=full.get_interm_embeddings())
    for kw in (dict(hq_token_only=True), dict(multimask_output=False)):
        a = pred.predict([[400, 267]], [1], **kw)
        b = full.predict([[400, 267]], [1], **kw)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_family_from_inputs_without_metadata(graphs, tmp_path):
    """A decoder graph without anyseg metadata is recognised as HQ-SAM by its interm_embeddings input."""
    m = onnx.load(str(graphs["decoder"]))
    del m.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(m, str(path))
    assert open_graph(path, "sam_decoder", providers=CPU).family == "sam_hq"


def test_fast_decoder_refused(model, tmp_path):
    with pytest.raises(ValueError, match="HQ"):
        export_decoder(model, tmp_path / "fast.onnx", fast=True)


@pytest.mark.slow
def test_return_single_mask(model, tmp_path):
    path = export_decoder(model, tmp_path / "single.onnx", return_single_mask=True)
    sess = ort.InferenceSession(str(path), providers=CPU)
    assert sess.get_modelmeta().custom_metadata_map["anyseg.num_masks"] == "1"
    full = export_decoder(model, tmp_path / "full.onnx")
    full_sess = ort.InferenceSession(str(full), providers=CPU)
    rng = np.random.default_rng(0)
    feeds = {"image_embeddings": rng.standard_normal((1, 256, 64, 64)).astype(np.float32),
             "interm_embeddings": rng.standard_normal((1, 64, 64, 96)).astype(np.float32),
             "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32),
             "hq_token_only": np.zeros(1, np.float32), "orig_im_size": np.array([534, 800], np.float32)}
    # One click + padding point: the multimask answer (output 1); three tokens: output 0.
    for n, pick in ((2, 1), (3, 0)):
        pts = {"point_coords": rng.uniform(0, 1000, (1, n, 2)).astype(np.float32),
               "point_labels": np.array([[1.0] * (n - 1) + [-1.0]], np.float32)}
        one = sess.run(None, {**feeds, **pts})
        both = full_sess.run(None, {**feeds, **pts})
        np.testing.assert_allclose(one[2][0, 0], both[2][0, pick], atol=1e-5)


@pytest.mark.slow
def test_cli_export_tiny_vit(tmp_path, manifest):
    """`anyseg export` on the Light HQ-SAM (TinyViT) golden checkpoint; the pair against SamPredictor."""
    from anyseg.cli import main

    ckpt = _compose("mobilesam", tmp_path)
    dec, enc = tmp_path / "dec.onnx", tmp_path / "enc.onnx"
    assert main(["export", "--model", str(ckpt), "--decoder", str(dec), "--encoder", str(enc)]) == 0
    model = anyseg.load_model(ckpt, device="cpu")
    pred = OnnxPredictor(enc, dec, providers=CPU)
    assert pred.family == "sam_hq"
    pred.set_image(IMAGES / "truck.jpg")
    assert pred.get_interm_embeddings().shape == (1, 64, 64, 160)
    ref = SamPredictor(model)
    ref.set_image(IMAGES / "truck.jpg")
    assert np.abs(pred.get_interm_embeddings() - ref.interm_features.numpy()).max() <= 1e-3
    entry = next(e for e in manifest["mobilesam"]["predictor"] if e["image"] == "truck.jpg")
    golden = np.load(HQ / entry["file"])
    for case in entry["cases"]:
        if case["name"] not in ("point_multi", "box_only_hq", "points_fg_bg_single_hq"):
            continue
        kw = _torch_kwargs(_predict_kwargs(case), None)
        got = pred.predict(**kw)
        _compare(case["name"], got, tuple(np.asarray(v) for v in ref.predict(**kw)), 1200, 1800)
        want_masks = unpack_masks(golden[f"{case['name']}_masks_packed"], golden[f"{case['name']}_masks_shape"])
        assert mask_iou(got[0][0], want_masks.reshape(-1, 1200, 1800)[0]) >= 0.999


@pytest.mark.slow
def test_hq_token_only_refused_by_sam_graphs(tmp_path):
    """A SAM 1 decoder graph refuses hq_token_only=True (it has no HQ token)."""
    sam = anyseg.load_model(_require(GOLDEN) / "vit_small_checkpoint.pth", device="cpu")
    dec = export_decoder(sam, tmp_path / "sam.onnx")
    pred = OnnxPredictor(None, dec, providers=CPU)
    assert pred.family == "sam"
    pred.set_image_embedding(np.zeros((1, 256, 64, 64), np.float32), (534, 800))
    with pytest.raises(ValueError, match="HQ-SAM"):
        pred.predict([[10, 10]], [1], hq_token_only=True)
    with pytest.raises(ValueError, match="HQ-SAM"):
        pred.set_image_embedding(np.zeros((1, 256, 64, 64), np.float32), (534, 800),
                                 interm_embeddings=np.zeros((1, 64, 64, 96), np.float32))
    with pytest.raises(GraphError):  # a decoder given as the encoder
        open_graph(dec, "sam_encoder", providers=CPU)
