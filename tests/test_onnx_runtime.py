"""anyseg.runtime.OnnxPredictor: the same masks as the torch SamPredictor, in a process where torch
cannot be imported; its API and input checks; clear errors for graphs that do not fit."""
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
pytest.importorskip("onnxruntime", reason="needs the onnx extra (pip install 'anyseg[onnx]')")

from conftest import mask_iou  # noqa: E402
from PIL import Image  # noqa: E402

import anyseg  # noqa: E402
from anyseg.export import export_decoder, export_encoder  # noqa: E402
from anyseg.geometry import boxes_to_model, coords_to_model  # noqa: E402
from anyseg.imageio import load_image  # noqa: E402
from anyseg.runtime import GraphError, ImageNotSetError, OnnxPredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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
    pred.set_image(job["image"])
    out = {"embedding": pred.get_image_embedding(), "original_size": np.array(pred.original_size),
           "input_size": np.array(pred.input_size)}
    mask_input = np.load(job["mask_input"])
    for i, case in enumerate(job["cases"]):
        kw = {k: (mask_input if k == "mask_input" else v) for k, v in case.items()}
        masks, scores, low_res = pred.predict(**kw)
        out[f"{i}_masks"], out[f"{i}_scores"], out[f"{i}_low_res"] = masks, scores, low_res
    if job["check_bgr"]:
        from anyseg.imageio import load_image
        rgb = load_image(job["image"])
        pred.set_image(np.ascontiguousarray(rgb[:, :, ::-1]), image_format="BGR")
        out["bgr_embedding"] = pred.get_image_embedding()
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    if loaded:
        raise SystemExit(f"torch modules were loaded: {loaded}")
    np.savez(job["out"], **out)
""")


def _cases(refine: np.ndarray, size) -> list:
    """Golden-style prompts for an (H, W) image, as JSON-able kwargs of predict."""
    h, w = size
    return [
        dict(point_coords=[[0.5 * w, 0.5 * h]], point_labels=[1], multimask_output=True),
        dict(point_coords=[[0.3 * w, 0.6 * h]], point_labels=[1], multimask_output=False),
        dict(point_coords=[[0.5 * w, 0.5 * h], [0.2 * w, 0.2 * h], [0.8 * w, 0.3 * h]], point_labels=[1, 0, 1],
             multimask_output=True),
        dict(box=[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h], multimask_output=False),
        dict(point_coords=[[0.4 * w, 0.5 * h], [0.65 * w, 0.85 * h]], point_labels=[1, 0],
             box=[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h], multimask_output=True),
        dict(point_coords=[[0.5 * w, 0.5 * h], [0.45 * w, 0.55 * h]], point_labels=[1, 1], mask_input="refine",
             multimask_output=False),
        dict(mask_input="refine", multimask_output=True),
    ]


@pytest.fixture(scope="module", params=["vit_small", "mobilesam"])
def graphs(request, manifest, golden_dir, images_dir, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(f"runtime_{name}")
    model = anyseg.load_model(golden_dir / manifest[name]["checkpoint"], device="cpu")
    if name == "vit_small":
        image_path = images_dir / "dog.jpg"
    else:  # a tiny 40 x 25 (H x W) image, through a PNG file
        image_path = out / "tiny.png"
        Image.fromarray(load_image(images_dir / "groceries.jpg")).resize((25, 40), Image.BILINEAR).save(image_path)
    golden = np.load(golden_dir / f"{name}_dog_predictor.npz")
    return dict(name=name, model=model, image=image_path, refine=golden["refine_mask_input"],
                embedding=golden["image_embedding"],
                decoder=export_decoder(model, out / "decoder.onnx"),
                encoder=export_encoder(model, out / "encoder.onnx"), out=out)


def test_same_masks_as_torch_without_torch(graphs):
    out = graphs["out"]
    block = out / "block_torch"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCK_TORCH)
    (out / "child.py").write_text(CHILD)
    np.save(out / "refine.npy", graphs["refine"])
    size = load_image(graphs["image"]).shape[:2]
    cases = _cases(graphs["refine"], size)
    job = dict(encoder=str(graphs["encoder"]), decoder=str(graphs["decoder"]), image=str(graphs["image"]),
               mask_input=str(out / "refine.npy"), cases=cases, out=str(out / "onnx_results.npz"),
               check_bgr=graphs["name"] == "mobilesam")
    (out / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(out / "child.py"), str(out / "job.json")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out / "onnx_results.npz")

    torch_pred = anyseg.SamPredictor(graphs["model"])
    torch_pred.set_image(graphs["image"])
    assert tuple(got["original_size"]) == tuple(torch_pred.original_size) == size
    assert tuple(got["input_size"]) == tuple(torch_pred.input_size)
    assert np.abs(got["embedding"] - torch_pred.get_image_embedding().numpy()).max() <= 1e-3
    if "bgr_embedding" in got:
        np.testing.assert_array_equal(got["bgr_embedding"], got["embedding"])
    for i, case in enumerate(cases):
        kw = {k: (graphs["refine"] if k == "mask_input" else v) for k, v in case.items()}
        masks, scores, low_res = torch_pred.predict(**{k: np.asarray(v) if k != "multimask_output" else v
                                                       for k, v in kw.items()})
        assert got[f"{i}_masks"].dtype == bool and got[f"{i}_masks"].shape == masks.shape, i
        np.testing.assert_allclose(got[f"{i}_scores"], scores, atol=1e-3, rtol=0)
        assert np.abs(got[f"{i}_low_res"] - low_res).max() <= 1e-3 * max(1.0, np.abs(low_res).max()), i
        for a, b in zip(got[f"{i}_masks"], masks):
            assert mask_iou(a, b) >= 0.999, i


@pytest.fixture()
def decoder_only(graphs):
    pred = OnnxPredictor(None, graphs["decoder"], providers=CPU)
    pred.set_image_embedding(graphs["embedding"], (534, 800))
    return pred


def test_state_and_prompt_layout(graphs, decoder_only):
    pred = decoder_only
    assert pred.is_image_set and pred.original_size == (534, 800) and pred.input_size == (684, 1024)
    np.testing.assert_array_equal(pred.get_image_embedding(), graphs["embedding"])
    coords, labels = pred.prompt_inputs([[400, 267], [10, 20]], [1, 0])
    np.testing.assert_array_equal(coords[0, :2], coords_to_model(np.array([[400, 267], [10, 20]]), (534, 800)))
    np.testing.assert_array_equal(coords[0, 2], [0, 0])
    np.testing.assert_array_equal(labels, [[1, 0, -1]])
    coords, labels = pred.prompt_inputs([[400, 267]], [1], box=[80, 100, 560, 480])
    np.testing.assert_array_equal(coords[0, 1:], boxes_to_model(np.array([80, 100, 560, 480]), (534, 800)).reshape(2, 2))
    np.testing.assert_array_equal(labels, [[1, 2, 3]])
    coords, labels = pred.prompt_inputs()
    assert coords.shape == (1, 0, 2) and labels.shape == (1, 0)

    masks, scores, low = pred.predict([[400, 267]], [1])
    assert masks.shape == (3, 534, 800) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, 256, 256)
    logits, _, _ = pred.predict([[400, 267]], [1], multimask_output=False, return_logits=True)
    assert logits.shape == (1, 534, 800) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, pred.predict([[400, 267]], [1], multimask_output=False)[0])

    pred.reset_image()
    assert not pred.is_image_set and pred.original_size is None and pred.input_size is None
    with pytest.raises(ImageNotSetError):
        pred.predict([[1, 1]], [1])
    with pytest.raises(ValueError, match="set_image_embedding"):
        pred.set_image(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(point_coords=[[1, 2]]), "together"),
    (dict(point_coords=[[1, 2]], point_labels=[2]), "0 \\(background\\) or 1"),
    (dict(point_coords=[[1, 2], [3, 4]], point_labels=[1]), "one per point"),
    (dict(point_coords=[[1, 2, 3]], point_labels=[1]), "N x 2"),
    (dict(point_coords=[[np.nan, 2]], point_labels=[1]), "NaN"),
    (dict(box=[10, 10, 5, 20]), "X1 >= X0"),
    (dict(box=[[0, 0, 5, 5], [1, 1, 6, 6]]), "one box"),
    (dict(point_coords=[[1, 2]], point_labels=[1], mask_input=np.zeros((1, 64, 64))), "256 x 256"),
])
def test_bad_prompts(decoder_only, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoder_only.predict(**kwargs)


def test_bad_images_and_embeddings(graphs, decoder_only):
    with pytest.raises(ValueError, match="shape"):
        decoder_only.set_image_embedding(np.zeros((1, 256, 32, 32), np.float32), (10, 10))
    with pytest.raises(ValueError, match="positive"):
        decoder_only.set_image_embedding(graphs["embedding"], (0, 10))
    pred = OnnxPredictor(graphs["encoder"], graphs["decoder"], providers=CPU)
    with pytest.raises(ValueError, match="image_format"):
        pred.set_image(np.zeros((8, 8, 3), np.uint8), image_format="HSV")


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src), load_external_data=True)
    edit(model)
    onnx.save_model(model, str(dst))
    return dst


def _set_meta(key, value):
    def edit(model):
        for p in model.metadata_props:
            if p.key == key:
                p.value = value
    return edit


def test_graphs_that_do_not_fit(graphs, tmp_path):
    enc, dec = graphs["encoder"], graphs["decoder"]
    with pytest.raises(FileNotFoundError):
        OnnxPredictor(None, tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="could not be loaded as an ONNX model"):
        OnnxPredictor(None, garbage)
    with pytest.raises(ValueError, match="is an anyseg image encoder graph, expected the decoder"):
        OnnxPredictor(None, enc)
    with pytest.raises(ValueError, match="is an anyseg decoder graph, expected the image encoder"):
        OnnxPredictor(dec, dec)
    # Opset: a graph claiming an opset onnxruntime does not know, and metadata outside 13..20.
    def future_opset(model):
        model.opset_import[0].version = 99

    future = _edited_copy(dec, tmp_path / "future.onnx", future_opset)
    with pytest.raises(ValueError, match="could not be loaded"):
        OnnxPredictor(None, future)
    old = _edited_copy(dec, tmp_path / "old.onnx", _set_meta("anyseg.opset", "9"))
    with pytest.raises(ValueError, match="opset 9"):
        OnnxPredictor(None, old)
    newer = _edited_copy(dec, tmp_path / "newer.onnx", _set_meta("anyseg.format", "2"))
    with pytest.raises(ValueError, match="format"):
        OnnxPredictor(None, newer)

    # Wrong input names: an identity graph with anyseg decoder metadata.
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["x"], ["masks"])], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("masks", onnx.TensorProto.FLOAT, [1, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    h.set_model_props(model, {"anyseg.kind": "sam_decoder", "anyseg.opset": "17"})
    wrong = tmp_path / "wrong_inputs.onnx"
    onnx.save_model(model, str(wrong))
    with pytest.raises(GraphError, match=r"inputs \['x'\]"):
        OnnxPredictor(None, wrong)
    # Encoders must say what they are (their pre-processing differs between exporters).
    plain = _edited_copy(enc, tmp_path / "plain_encoder.onnx", lambda m: m.ClearField("metadata_props"))
    with pytest.raises(ValueError, match="no anyseg metadata"):
        OnnxPredictor(plain, dec)


def test_reference_style_decoder_without_metadata(graphs, decoder_only, tmp_path):
    """A decoder with the reference SAM ONNX interface but no anyseg metadata is accepted."""
    bare = _edited_copy(graphs["decoder"], tmp_path / "bare.onnx", lambda m: m.ClearField("metadata_props"))
    pred = OnnxPredictor(None, bare, providers=CPU)
    pred.set_image_embedding(graphs["embedding"], (534, 800))
    got = pred.predict([[400, 267]], [1], return_logits=True)
    want = decoder_only.predict([[400, 267]], [1], return_logits=True)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
