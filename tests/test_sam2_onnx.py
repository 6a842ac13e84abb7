"""SAM 2 as ONNX graphs: the exported encoder and decoder against SAM2ImagePredictor on the golden model, the
torch-free runtime (in a process where torch cannot be imported), its numpy resize against torch's, the
graphs' interface, family detection, options, the CLI and int8 copies."""
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
import torch.nn.functional as F  # noqa: E402
from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks  # noqa: E402
from PIL import Image  # noqa: E402

from anyseg.export import (SAM2_DECODER_INPUTS, SAM2_DECODER_OUTPUTS, SAM2_ENCODER_OUTPUTS,  # noqa: E402
                           export_decoder, export_encoder)
from anyseg.runtime import GraphError, OnnxPredictor  # noqa: E402
from anyseg.runtime.resize import aa_weights, resize_bilinear_aa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAM2 = GOLDEN / "sam2"
CPU = ["CPUExecutionProvider"]

# Installed first on sys.meta_path of the child process: any attempt to import torch fails.
BLOCK_TORCH = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process: " + name)
            return None

    sys.meta_path.insert(0, _NoTorch())
""")

# Runs every golden image case with OnnxPredictor (its own arguments); boxes of a batch one at a time
# (predict takes one box).
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable: the blocker did not work")
    from PIL import Image
    from anyseg.runtime import OnnxPredictor

    job = json.loads(open(sys.argv[1]).read())
    pred = OnnxPredictor(job["encoder"], job["decoder"], providers=["CPUExecutionProvider"])
    assert pred.family == "sam2", pred.family
    pred.set_image(np.array(Image.open(job["image"]).convert("RGB")))
    hr0, hr1 = pred.get_high_res_features()
    out = {"embedding": pred.get_image_embedding(), "high_res_0": hr0, "high_res_1": hr1,
           "original_size": np.array(pred.original_size), "input_size": np.array(pred.input_size)}
    mask_input = np.load(job["mask_input"])
    for case in job["cases"]:
        kw = {k: (mask_input if k == "mask_input" else v) for k, v in case["args"].items()}
        boxes = np.asarray(kw.pop("box")) if "box" in kw else None
        runs = [boxes] if boxes is None or boxes.ndim == 1 else list(boxes)
        results = [pred.predict(box=box, **kw) for box in runs]
        for i, key in enumerate(("masks", "scores", "low_res")):
            parts = [r[i] for r in results]
            out[case["name"] + "_" + key] = parts[0] if boxes is None or boxes.ndim == 1 else np.stack(parts)
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    if loaded:
        raise SystemExit(f"torch modules were loaded: {loaded}")
    np.savez(job["out"], **out)
""")


@pytest.fixture(scope="module")
def manifest2():
    return json.loads((_require(SAM2) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model():
    import anyseg

    return anyseg.load_model(_require(SAM2) / "sam2.1_golden.pt", device="cpu")


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sam2_onnx")
    return dict(out=out, encoder=export_encoder(model, out / "encoder.onnx"),
                decoder=export_decoder(model, out / "decoder.onnx"))


@pytest.fixture(scope="module")
def dog(graphs):
    """An OnnxPredictor with dog.jpg set (shared: encoding takes a few seconds)."""
    pred = OnnxPredictor(graphs["encoder"], graphs["decoder"], providers=CPU)
    pred.set_image(_rgb("dog.jpg"))
    return pred


def _rgb(name):
    return np.array(Image.open(_require(IMAGES) / name).convert("RGB"))


def _torch_args(args, golden):
    out = {}
    for key, value in args.items():
        if key == "mask_input":
            out[key] = golden[value].astype(np.float32)
        elif isinstance(value, list):
            out[key] = np.array(value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("size", [(1200, 1800), (534, 800), (40, 25), (3000, 700), (7, 2000), (1024, 1024)])
def test_resize_matches_torch(size):
    """The numpy antialiased resize against F.interpolate(..., antialias=True): shrinking (up to 3x) and
    enlarging; torch's float32 bits on the machines measured, within 2 ulp anywhere."""
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # as sam2_image_to_tensor
    want = F.interpolate(x[None], size=(1024, 1024), mode="bilinear", align_corners=False, antialias=True)[0]
    got = resize_bilinear_aa(image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0), (1024, 1024))
    assert got.dtype == np.float32 and got.shape == (3, 1024, 1024)
    assert np.abs(got - want.numpy()).max() <= 2.5e-7
    # 256 x 256 output from the large sizes: up to 12 taps per pixel.
    want = F.interpolate(x[None], size=(256, 256), mode="bilinear", align_corners=False, antialias=True)[0]
    got = resize_bilinear_aa(x.numpy(), (256, 256))
    assert np.abs(got - want.numpy()).max() <= 2.5e-7


@pytest.mark.parametrize("in_size", [25, 800, 1800, 3000])
def test_resize_weights_are_torchs(in_size):
    """Resizing one-hot rows recovers torch's weights exactly (one tap times 1.0, the others times 0)."""
    eye = torch.eye(in_size)[:, None, None, :]
    want = F.interpolate(eye, size=(1, 1024), mode="bilinear", align_corners=False, antialias=True)[:, 0, 0, :]
    index, weight, sizes = aa_weights(in_size, 1024)
    dense = np.zeros((in_size, 1024), np.float32)
    for j in range(index.shape[1]):
        live = j < sizes
        dense[index[live, j], np.nonzero(live)[0]] = weight[live, j]
    np.testing.assert_array_equal(dense, want.numpy())
    assert np.allclose(weight.sum(1), 1.0, atol=1e-6) and (weight >= 0).all()


def test_resize_properties():
    flat = np.full((3, 37, 91), 0.25, np.float32)
    np.testing.assert_allclose(resize_bilinear_aa(flat, (1024, 512)), 0.25, atol=1e-7)
    ramp = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (2, 1))
    out = resize_bilinear_aa(ramp, (2, 50))
    assert out.shape == (2, 50) and (np.diff(out[0]) > 0).all() and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear_aa(flat, (0, 10))


# ------------------------------------------------------------------------------- graphs and runtime
def test_graph_interface_and_metadata(graphs):
    enc = ort.InferenceSession(str(graphs["encoder"]), providers=CPU)
    dec = ort.InferenceSession(str(graphs["decoder"]), providers=CPU)
    assert [i.name for i in enc.get_inputs()] == ["image"]
    assert enc.get_inputs()[0].shape[1:] == [3, 1024, 1024]
    assert [o.name for o in enc.get_outputs()] == list(SAM2_ENCODER_OUTPUTS)
    assert [o.shape[1:] for o in enc.get_outputs()] == [[256, 64, 64], [32, 256, 256], [64, 128, 128]]
    assert [i.name for i in dec.get_inputs()] == list(SAM2_DECODER_INPUTS)
    assert [o.name for o in dec.get_outputs()] == list(SAM2_DECODER_OUTPUTS)
    assert [o.shape for o in dec.get_outputs()][1:] == [[1, 4], [1, 4, 256, 256], [1, 1]]
    meta_e = enc.get_modelmeta().custom_metadata_map
    meta_d = dec.get_modelmeta().custom_metadata_map
    assert meta_e["anyseg.family"] == meta_d["anyseg.family"] == "sam2"
    assert (meta_e["anyseg.kind"], meta_d["anyseg.kind"]) == ("sam_encoder", "sam_decoder")
    assert meta_e["anyseg.pixel_mean"] == "0.485,0.456,0.406" and meta_d["anyseg.num_masks"] == "4"


def test_encoder_graph_batch(graphs):
    """Dynamic batch: an image encoded with another gives its single-image outputs (the torch parity of
    the features is in the runtime test)."""
    sess = ort.InferenceSession(str(graphs["encoder"]), providers=CPU)
    x = np.random.default_rng(0).standard_normal((2, 3, 1024, 1024)).astype(np.float32)
    both = sess.run(None, {"image": x})
    single = sess.run(None, {"image": x[1:]})
    for a, b in zip(both, single):
        assert a.shape[0] == 2 and np.abs(a[1:] - b).max() <= 1e-5


@pytest.mark.parametrize("index", [0, 1], ids=["truck", "dog"])
def test_runtime_without_torch_matches_predictor(index, model, graphs, manifest2, tmp_path):
    """OnnxPredictor in a process that cannot import torch against SAM2ImagePredictor (every golden case;
    low-res logits, and the full-size ones of the return_logits case, within 1e-3 relative, masks IoU
    >= 0.999) and against the golden data (its tolerances)."""
    from anyseg.sam2_predictor import SAM2ImagePredictor

    entry = manifest2["image"][index]
    tol = manifest2["tolerances"]["image"]
    golden = np.load(SAM2 / entry["file"])
    block = tmp_path / "block_torch"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_TORCH)
    (tmp_path / "child.py").write_text(CHILD)
    np.save(tmp_path / "mask_input.npy", golden["point_multi_best_low_res"].astype(np.float32))
    job = dict(encoder=str(graphs["encoder"]), decoder=str(graphs["decoder"]), image=str(IMAGES / entry["image"]),
               mask_input=str(tmp_path / "mask_input.npy"), cases=entry["cases"], out=str(tmp_path / "got.npz"))
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "job.json")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")

    pred = SAM2ImagePredictor(model)
    pred.set_image(_rgb(entry["image"]))
    h, w = entry["image_hw"]
    assert tuple(got["original_size"]) == (h, w) and tuple(got["input_size"]) == (1024, 1024)
    want_feats = (pred.get_image_embedding(),) + tuple(pred._features["high_res_feats"])
    for key, ref in zip(("embedding", "high_res_0", "high_res_1"), want_feats):
        assert np.abs(got[key] - ref.numpy()).max() <= 1e-4, key
    for case in entry["cases"]:
        name = case["name"]
        args = _torch_args(case["args"], golden)
        masks, iou, low_res = pred.predict(**args)
        g_masks, g_iou, g_low = got[name + "_masks"], got[name + "_scores"], got[name + "_low_res"]
        assert g_masks.shape == masks.shape and g_low.shape == low_res.shape, name
        if args.get("return_logits"):  # full-size logits
            assert g_masks.dtype == np.float32
            assert np.abs(g_masks - masks).max() <= 1e-3 * max(1.0, np.abs(masks).max()), name
            g_masks, masks = g_masks > 0, masks > 0
        else:
            assert g_masks.dtype == bool and masks.dtype == np.float32
        assert np.abs(g_low - low_res).max() <= 1e-3 * max(1.0, np.abs(low_res).max()), name
        assert np.abs(g_low).max() <= 32.0
        np.testing.assert_allclose(g_iou, iou, atol=1e-4, rtol=0, err_msg=name)
        for a, b in zip(g_masks.reshape(-1, h, w), (masks > 0).reshape(-1, h, w)):
            assert mask_iou(a, b) >= 0.999, name
        # The golden data, with its tolerances.
        want = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
        for a, b in zip(g_masks.reshape(-1, h, w), want.reshape(-1, h, w)):
            assert mask_iou(a, b) >= tol["mask_iou"], name
        np.testing.assert_allclose(g_iou, golden[f"{name}_iou"], atol=tol["iou_atol"], rtol=0, err_msg=name)
        ref = golden[f"{name}_low_res_sampled"].astype(np.float32)
        assert (np.abs(g_low[..., ::4, ::4] - ref) <= tol["logits_atol"] + tol["logits_rtol"] * np.abs(ref)).all()


def test_dynamic_fallback_in_graph(model, graphs, manifest2):
    """Output 0 of the decoder graph is the single-mask answer after the stability fallback: mask 0 when
    stable, else the best multimask output (the golden truck's 'unnormalized' prompt is unstable)."""
    pred = OnnxPredictor(graphs["encoder"], graphs["decoder"], providers=CPU)
    pred.set_image(_rgb("truck.jpg"))
    dec = model.sam_mask_decoder
    cases = {c["name"]: c["args"] for c in manifest2["image"][0]["cases"]}
    seen = set()
    for name in ("point_single", "unnormalized"):
        args = dict(cases[name])
        coords, labels = pred.prompt_inputs(args["point_coords"], args["point_labels"], args.get("box"),
                                            normalize_coords=args.get("normalize_coords", True))
        feeds = {"point_coords": coords, "point_labels": labels, "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                 "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([1200, 1800], np.float32),
                 "image_embeddings": pred.get_image_embedding()}
        feeds.update(zip(("high_res_feats_0", "high_res_feats_1"), pred.get_high_res_features()))
        masks, iou, low, score = pred.decoder.run(feeds)
        assert masks.shape == (1, 4, 1200, 1800) and iou.shape == (1, 4) and score.shape == (1, 1)
        # What the model's own decoder computes for these prompts, all four masks.
        with torch.inference_mode():
            # The prompt encoder appends the pad point itself.
            points = (torch.from_numpy(coords[:, :-1]), torch.from_numpy(labels[:, :-1]).int())
            sparse, dense = model.embed_prompts(points, None)
            feats = [torch.from_numpy(pred.get_image_embedding())] + [torch.from_numpy(f) for f in
                                                                      pred.get_high_res_features()]
            all_masks, all_iou, _, _ = dec.predict_all(feats[0], model.sam_prompt_encoder.get_dense_pe(), sparse,
                                                       dense, feats[1:])
            stable = bool(dec.stability(all_masks[:, :1]) >= dec.stability_thresh)
        best = 1 + int(np.argmax(iou[0, 1:]))
        chosen = 0 if stable else best
        ref = torch.clamp(all_masks[0, chosen], -32, 32).numpy()
        assert np.abs(low[0, 0] - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()), name
        if not stable:
            np.testing.assert_array_equal(low[0, 0], low[0, best])
        assert abs(float(iou[0, 0]) - float(all_iou[0, chosen])) <= 1e-5
        seen.add(stable)
    assert seen == {True, False}  # both branches taken


def test_decoder_only_predictor_and_prompt_layout(model, graphs, dog):
    from anyseg.sam2_predictor import SAM2ImagePredictor

    full = dog
    pred = OnnxPredictor(None, graphs["decoder"], providers=CPU)
    assert pred.family == "sam2"
    with pytest.raises(ValueError, match="high-res features"):
        pred.set_image_embedding(full.get_image_embedding(), (534, 800))
    with pytest.raises(ValueError, match="high_res_feats_0"):
        pred.set_image_embedding(full.get_image_embedding(), (534, 800), [np.zeros((1, 32, 64, 64))] * 2)
    pred.set_image_embedding(full.get_image_embedding(), (534, 800), full.get_high_res_features())
    assert pred.input_size == (1024, 1024) and pred.original_size == (534, 800)

    # Box corners first, then the clicks, then the pad point; coordinates as SAM2ImagePredictor's.
    torch_pred = SAM2ImagePredictor(model)
    coords, labels = pred.prompt_inputs([[400, 267.5], [10, 20]], [1, 0], box=[80, 100, 560, 480.5])
    np.testing.assert_array_equal(labels, [[2, 3, 1, 0, -1]])
    want = torch_pred.transform_coords(torch.tensor([[80, 100], [560, 480.5], [400, 267.5], [10, 20]],
                                                    dtype=torch.float32), True, (534, 800))
    np.testing.assert_array_equal(coords[0, :4], want.numpy())
    np.testing.assert_array_equal(coords[0, 4], [0, 0])
    coords, labels = pred.prompt_inputs([[0.5, 0.25]], [1], normalize_coords=False)
    np.testing.assert_array_equal(coords, [[[512, 256], [0, 0]]])
    np.testing.assert_array_equal(labels, [[1, -1]])
    coords, labels = pred.prompt_inputs()
    assert coords.shape == (1, 0, 2) and labels.shape == (1, 0)

    for kw in (dict(point_coords=[[400, 267]], point_labels=[1]),
               dict(box=[80, 100, 560, 480], multimask_output=False)):
        for a, b in zip(pred.predict(**kw), full.predict(**kw)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="one box"):
        pred.predict(box=[[0, 0, 5, 5], [1, 1, 6, 6]])


def _sam1_style_encoder(path: Path) -> Path:
    """A stand-in SAM 1 encoder graph (anyseg metadata, one image_embeddings output)."""
    h = onnx.helper
    graph = h.make_graph([h.make_node("AveragePool", ["image"], ["image_embeddings"], kernel_shape=[16, 16],
                                      strides=[16, 16])], "g",
                         [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 1024, 1024])],
                         [h.make_tensor_value_info("image_embeddings", onnx.TensorProto.FLOAT, [1, 3, 64, 64])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    h.set_model_props(model, {"anyseg.kind": "sam_encoder", "anyseg.opset": "17", "anyseg.format": "1"})
    onnx.save_model(model, str(path))
    return path


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save_model(model, str(dst))
    return dst


def _drop_meta(key):
    def edit(model):
        keep = [(p.key, p.value) for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        for k, v in keep:
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
    return edit


def test_family_detection_and_mismatch(graphs, tmp_path):
    dec = graphs["decoder"]
    with pytest.raises(GraphError, match="export both from the same model"):
        OnnxPredictor(_sam1_style_encoder(tmp_path / "sam1_encoder.onnx"), dec, providers=CPU)
    # Without the family key, and without any metadata, the high-res inputs say SAM 2.
    no_family = _edited_copy(dec, tmp_path / "no_family.onnx", _drop_meta("anyseg.family"))
    assert OnnxPredictor(None, no_family, providers=CPU).family == "sam2"
    bare = _edited_copy(dec, tmp_path / "bare.onnx", lambda m: m.ClearField("metadata_props"))
    assert OnnxPredictor(None, bare, providers=CPU).family == "sam2"

    def future_family(model):
        for p in model.metadata_props:
            if p.key == "anyseg.family":
                p.value = "sam9"
    with pytest.raises(GraphError, match="model family 'sam9'"):
        OnnxPredictor(None, _edited_copy(dec, tmp_path / "sam9.onnx", future_family), providers=CPU)

    def claim_sam1(model):
        for p in model.metadata_props:
            if p.key == "anyseg.family":
                p.value = "sam"
    with pytest.raises(GraphError, match="not a SAM decoder graph: inputs"):
        OnnxPredictor(None, _edited_copy(dec, tmp_path / "as_sam1.onnx", claim_sam1), providers=CPU)


def test_single_mask_graph_and_refused_options(model, graphs, dog, tmp_path):
    single = export_decoder(model, tmp_path / "single.onnx", return_single_mask=True)
    features = (dog.get_image_embedding(), (40, 60), dog.get_high_res_features())  # as if of a 40 x 60 image
    full = OnnxPredictor(None, graphs["decoder"], providers=CPU)
    full.set_image_embedding(*features)
    pred = OnnxPredictor(None, single, providers=CPU)
    pred.set_image_embedding(*features)
    with pytest.raises(ValueError, match="one mask"):
        pred.predict([[30, 20]], [1])
    kw = dict(point_coords=[[30, 20]], point_labels=[1], multimask_output=False, return_logits=True)
    for a, b in zip(pred.predict(**kw), full.predict(**kw)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4
    for option in ("fast", "use_stability_score", "image_cache"):
        with pytest.raises(ValueError, match=f"{option}=True: not available for SAM 2"):
            export_decoder(model, tmp_path / "x.onnx", **{option: True})
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_and_int8(dog, tmp_path, capsys):
    from anyseg.cli import main

    ckpt = str(SAM2 / "sam2.1_golden.pt")
    dec, enc = tmp_path / "d.onnx", tmp_path / "e.onnx"
    assert main(["export", "--model", ckpt, "--decoder", str(dec), "--encoder", str(enc), "--quantize"]) == 0
    err = capsys.readouterr().err
    assert "d.int8.onnx" in err and "e.int8.onnx" in err
    meta = ort.InferenceSession(str(enc), providers=CPU).get_modelmeta().custom_metadata_map
    assert meta["anyseg.family"] == "sam2" and meta["anyseg.kind"] == "sam_encoder"
    image = _rgb("dog.jpg")
    ref = OnnxPredictor(None, dec, providers=CPU)  # the CLI's float32 decoder, the fixture's encoding
    ref.set_image_embedding(dog.get_image_embedding(), image.shape[:2], dog.get_high_res_features())
    # int8 weights (both graphs): measured mask IoU >= 0.98 against float32 on these prompts.
    q = OnnxPredictor(tmp_path / "e.int8.onnx", tmp_path / "d.int8.onnx", providers=CPU)
    assert q.encoder.metadata["anyseg.quantized"].startswith("int8") and q.family == "sam2"
    q.set_image(image)
    for kw in (dict(point_coords=[[400, 267]], point_labels=[1]),
               dict(box=[80, 107, 560, 480], multimask_output=False)):
        for a, b in zip(q.predict(**kw)[0], ref.predict(**kw)[0]):
            assert mask_iou(a, b) >= 0.95
