"""The reference's ONNX notebook, with only the import changed: the export recipe through
``anyseg.utils.onnx.SamOnnxModel`` (the same graph as ``anyseg export``) and the client half that runs
it with ONNX Runtime (the same results as the predictor).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from anyseg import masks as M
from compat_helpers import GOLDEN_IDS, GOLDEN_MODELS, golden_models, read_rgb  # noqa: F401 (fixture)
from conftest import mask_iou

# The imports user code makes, with ``segment_anything`` replaced by ``anyseg``.
from anyseg import SamPredictor


def reference_export(sam, path, return_single_mask=True, **kwargs) -> None:
    """The reference's export recipe. ``dynamo=False``: torch >= 2.9 defaults to its new exporter,
    which the recipe (and the reference's own module) predates."""
    from anyseg.utils.onnx import SamOnnxModel

    onnx_model = SamOnnxModel(sam, return_single_mask=return_single_mask, **kwargs)
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    embed_dim = sam.prompt_encoder.embed_dim
    embed_size = sam.prompt_encoder.image_embedding_size
    mask_input_size = [4 * x for x in embed_size]
    dummy_inputs = {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    output_names = ["masks", "iou_predictions", "low_res_masks"]
    _ = onnx_model(**dummy_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "wb") as f:
            torch.onnx.export(onnx_model, tuple(dummy_inputs.values()), f, export_params=True, verbose=False,
                              opset_version=17, do_constant_folding=True, input_names=list(dummy_inputs.keys()),
                              output_names=output_names, dynamic_axes=dynamic_axes, dynamo=False)


@pytest.fixture(scope="module", params=GOLDEN_MODELS, ids=GOLDEN_IDS)
def onnx_graphs(request, golden_models, tmp_path_factory):
    pytest.importorskip("onnx", reason="needs the onnx extra (pip install 'anyseg[onnx]')")
    pytest.importorskip("onnxruntime", reason="needs the onnx extra (pip install 'anyseg[onnx]')")
    from anyseg.export import export_decoder

    sam, model = golden_models[request.param[0]]
    out = tmp_path_factory.mktemp("dropin_onnx")
    torch.manual_seed(0)
    reference_export(sam, out / "sam_onnx_example.onnx")
    export_decoder(model, out / "anyseg.onnx", return_single_mask=True, opset=17)
    return dict(key=request.param[0], sam=sam, reference=out / "sam_onnx_example.onnx", ours=out / "anyseg.onnx")


@pytest.mark.golden
def test_onnx_recipe_gives_anyseg_exports_graph(onnx_graphs):
    import onnx
    from onnx import numpy_helper

    a, b = onnx.load(str(onnx_graphs["reference"])), onnx.load(str(onnx_graphs["ours"]))
    assert [onnx.printer.to_text(n) for n in a.graph.node] == [onnx.printer.to_text(n) for n in b.graph.node]
    assert [(i.name, i.type) for i in a.graph.input] == [(i.name, i.type) for i in b.graph.input]
    # Outputs: the same names and element types; only the symbolic names of the masks' dynamic size differ
    # (``anyseg export`` names them height / width, the recipe leaves them to the exporter).
    assert [(o.name, o.type.tensor_type.elem_type, len(o.type.tensor_type.shape.dim)) for o in a.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type, len(o.type.tensor_type.shape.dim)) for o in b.graph.output]
    init_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    init_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert init_a.keys() == init_b.keys()
    for name in init_a:
        np.testing.assert_array_equal(init_a[name], init_b[name], err_msg=name)


@pytest.mark.golden
def test_onnx_notebook_client(onnx_graphs, images_dir):
    import onnxruntime

    sam = onnx_graphs["sam"]
    # --- the client half of the reference's ONNX notebook, with the import changed ---
    ort_session = onnxruntime.InferenceSession(str(onnx_graphs["reference"]), providers=["CPUExecutionProvider"])
    image = read_rgb(images_dir / "truck.jpg")
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    image_embedding = predictor.get_image_embedding().cpu().numpy()

    input_point = np.array([[500, 375]])
    input_label = np.array([1])
    onnx_coord = np.concatenate([input_point, np.array([[0.0, 0.0]])], axis=0)[None, :, :]
    onnx_label = np.concatenate([input_label, np.array([-1])], axis=0)[None, :].astype(np.float32)
    onnx_coord = predictor.transform.apply_coords(onnx_coord, image.shape[:2]).astype(np.float32)
    onnx_mask_input = np.zeros((1, 1, 256, 256), dtype=np.float32)
    onnx_has_mask_input = np.zeros(1, dtype=np.float32)
    ort_inputs = {
        "image_embeddings": image_embedding,
        "point_coords": onnx_coord,
        "point_labels": onnx_label,
        "mask_input": onnx_mask_input,
        "has_mask_input": onnx_has_mask_input,
        "orig_im_size": np.array(image.shape[:2], dtype=np.float32),
    }
    logits, scores, low_res_logits = ort_session.run(None, ort_inputs)
    masks = logits > predictor.model.mask_threshold

    # a box and a background point, with the previous low-res mask fed back
    input_box = np.array([425, 600, 700, 875])
    box_point, box_label = np.array([[575, 750]]), np.array([0])
    onnx_box_coords = input_box.reshape(2, 2)
    onnx_box_labels = np.array([2, 3])
    onnx_coord2 = np.concatenate([box_point, onnx_box_coords], axis=0)[None, :, :]
    onnx_label2 = np.concatenate([box_label, onnx_box_labels], axis=0)[None, :].astype(np.float32)
    ort_inputs.update(point_coords=predictor.transform.apply_coords(onnx_coord2, image.shape[:2]).astype(np.float32),
                      point_labels=onnx_label2, mask_input=low_res_logits, has_mask_input=np.ones(1, np.float32))
    logits2, scores2, _ = ort_session.run(None, ort_inputs)

    # --- the same as anyseg's predictor (ONNX Runtime against torch: the export tests' tolerances) ---
    want_logits, want_scores, want_low_res = predictor.predict(input_point, input_label, multimask_output=True,
                                                               return_logits=True)
    best = int(np.argmax(want_scores))  # one click: the best of the three, as return_single_mask picks
    assert masks.shape == (1, 1, *image.shape[:2])
    assert abs(scores[0, 0] - want_scores[best]) <= 1e-3
    assert mask_iou(masks[0, 0], want_logits[best] > 0) >= 0.999
    assert np.abs(low_res_logits[0, 0] - want_low_res[best]).max() <= 1e-3 * max(1.0, np.abs(want_low_res[best]).max())
    want2, want_scores2, _ = predictor.predict(box_point, box_label, box=input_box, mask_input=low_res_logits[0],
                                               multimask_output=False, return_logits=True)
    assert abs(scores2[0, 0] - want_scores2[0]) <= 1e-3
    assert mask_iou(logits2[0, 0] > 0, want2[0] > 0) >= 0.999


def test_onnx_model_extra_metrics(golden_models):
    from anyseg.utils.onnx import SamOnnxModel

    sam, _ = golden_models["vit_t"]
    gen = torch.Generator().manual_seed(0)
    inputs = dict(image_embeddings=torch.randn(1, 256, 64, 64, generator=gen),
                  point_coords=torch.tensor([[[300.0, 200.0], [0.0, 0.0]]]), point_labels=torch.tensor([[1.0, -1.0]]),
                  mask_input=torch.zeros(1, 1, 256, 256), has_mask_input=torch.zeros(1),
                  orig_im_size=torch.tensor([120.0, 200.0]))
    with torch.no_grad():
        plain = SamOnnxModel(sam, return_single_mask=False)(**inputs)
        extra = SamOnnxModel(sam, False, use_stability_score=False, return_extra_metrics=True)(**inputs)
        stable = SamOnnxModel(sam, return_single_mask=False, use_stability_score=True)(**inputs)
    assert len(plain) == 3 and len(extra) == 5
    masks, scores, stability, areas, low_res = extra
    assert masks.shape == (1, 4, 120, 200) and low_res.shape == (1, 4, 256, 256)
    for a, b in zip(plain, (masks, scores, low_res)):
        assert torch.equal(a, b)
    assert torch.equal(stability, M.calculate_stability_score(masks, 0.0, 1.0))
    assert torch.equal(areas, (masks > 0).sum((-1, -2)))
    assert torch.equal(stable[1], M.calculate_stability_score(low_res, 0.0, 1.0))


