"""Checkpoints: architecture inference, loading, saving and the errors for files that do not fit."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

import anyseg
from anyseg.checkpoint import (CheckpointError, infer_config, model_from_state_dict, read_state_dict,
                               save_model)
from anyseg.config import VARIANTS, SamConfig, TinyViTConfig, ViTConfig
from anyseg.modeling.sam import build_sam

GOLDEN_MODELS = ["vit_small", "mobilesam"]


# ------------------------------------------------------------------------------------------ helpers
def shape_only_state_dict(config: SamConfig) -> dict:
    """A state dict with the keys and shapes of ``build_sam(config)`` whose tensors hold no memory.

    ViT models are built on the meta device. TinyViT computes its attention-offset table with real
    tensor values while it is constructed, which the meta device cannot do; its models are small,
    so they are built on the CPU.
    """
    if isinstance(config.encoder, TinyViTConfig):
        model = build_sam(config)
    else:
        with torch.device("meta"):
            model = build_sam(config)
    return {k: torch.zeros(()).expand(v.shape) for k, v in model.state_dict().items()}


def _side_effect(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


class CodeOnLoad:
    """Unpickling an instance calls ``_side_effect``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


@pytest.fixture(scope="module")
def golden_state_dicts(golden_dir, manifest):
    return {name: read_state_dict(golden_dir / manifest[name]["checkpoint"]) for name in GOLDEN_MODELS}


@pytest.fixture(scope="module")
def vit_small_path(golden_dir, manifest) -> Path:
    return golden_dir / manifest["vit_small"]["checkpoint"]


@pytest.fixture(scope="module")
def vit_small(vit_small_path):
    return anyseg.load_model(vit_small_path)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_infer_config_recovers_variants(name):
    config = VARIANTS[name]
    sd = shape_only_state_dict(config)
    # the tensors really are views of one element: nothing of the model's size was allocated
    assert all(t.untyped_storage().nbytes() <= 4 for t in sd.values())
    assert infer_config(sd) == config


def test_infer_config_custom_vit():
    config = SamConfig(encoder=ViTConfig(embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(2,),
                                         window_size=8, img_size=512))
    sd = shape_only_state_dict(config)
    inferred = infer_config(sd)
    assert inferred == config
    assert inferred.encoder.grid_size == 32
    # a ViT's input size is fixed by its position embedding
    with pytest.raises(CheckpointError, match="512 px"):
        infer_config(sd, img_size=1024)


def test_infer_config_custom_tiny_vit():
    encoder = TinyViTConfig(embed_dims=(16, 32, 48, 320), depths=(1, 2, 1, 1), num_heads=(2, 2, 3, 8),
                            window_sizes=(7, 5, 10, 4), mlp_ratio=2.0, mbconv_expand_ratio=2.0,
                            local_conv_size=5, num_classes=10)
    config = SamConfig(encoder=encoder)
    sd = shape_only_state_dict(config)
    assert infer_config(sd) == config
    # nothing in a TinyViT's weights depends on the input size: it is an argument
    small = SamConfig(encoder=TinyViTConfig(img_size=512))
    assert infer_config(shape_only_state_dict(small), img_size=512) == small


def test_golden_checkpoints_infer_to_manifest_architecture(golden_state_dicts, manifest):
    arch = manifest["vit_small"]["architecture"]
    assert arch["kind"] == "vit"
    enc = infer_config(golden_state_dicts["vit_small"]).encoder
    assert isinstance(enc, ViTConfig)
    want = arch["image_encoder"]
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.global_attn_indexes, enc.window_size) == (
        want["embed_dim"], want["depth"], want["num_heads"], tuple(want["global_attn_indexes"]),
        want["window_size"])
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.global_attn_indexes, enc.window_size) == (
        96, 4, 4, (1, 3), 14)
    assert infer_config(golden_state_dicts["vit_small"]) == SamConfig(
        encoder=ViTConfig(embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3)))

    assert manifest["mobilesam"]["architecture"]["kind"] == "tiny_vit"
    assert infer_config(golden_state_dicts["mobilesam"]) == VARIANTS["vit_t"]


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_load_golden_checkpoint(name, golden_dir, manifest, golden_state_dicts):
    path = golden_dir / manifest[name]["checkpoint"]
    # a str path works as well as a Path
    model = anyseg.load_model(str(path) if name == "mobilesam" else path)
    assert isinstance(model, anyseg.Sam)
    assert not model.training
    assert all(not m.training for m in model.modules())
    sd = model.state_dict()
    assert set(sd) == set(golden_state_dicts[name])
    for key, value in golden_state_dicts[name].items():
        assert torch.equal(sd[key], value), key


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_round_trip(vit_small, tmp_path, suffix):
    path = save_model(vit_small, tmp_path / "sub" / f"m{suffix}")
    assert path == tmp_path / "sub" / f"m{suffix}" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = anyseg.load_model(path)
    assert not loaded.training
    want, got = _state(vit_small), loaded.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_saved_pth_has_public_key_names(vit_small, tmp_path, golden_state_dicts):
    path = save_model(vit_small, tmp_path / "m.pth")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(saved, dict) and all(isinstance(v, torch.Tensor) for v in saved.values())
    assert set(saved) == set(golden_state_dicts["vit_small"])
    for key, value in golden_state_dicts["vit_small"].items():
        assert saved[key].shape == value.shape, key


def test_saved_pth_key_names_tiny_vit(golden_dir, manifest, tmp_path, golden_state_dicts):
    model = anyseg.load_model(golden_dir / manifest["mobilesam"]["checkpoint"])
    saved = torch.load(save_model(model, tmp_path / "m.pth"), map_location="cpu", weights_only=True)
    assert set(saved) == set(golden_state_dicts["mobilesam"])


def test_nested_state_dict_is_accepted(golden_state_dicts, tmp_path):
    path = tmp_path / "nested.pth"
    torch.save({"model": golden_state_dicts["vit_small"]}, path)
    model = anyseg.load_model(path)
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"],
                       golden_state_dicts["vit_small"]["mask_decoder.iou_token.weight"])


def test_load_model_dtype(vit_small_path):
    model = anyseg.load_model(vit_small_path, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    assert not model.training


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_refuses_pickle_that_runs_code(tmp_path, how):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"weight": torch.zeros(2), "payload": CodeOnLoad(str(marker))}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": CodeOnLoad(str(marker))}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of the plain pickle
        with pytest.raises(CheckpointError, match="refused to load") as info:
            anyseg.load_model(path)
    message = str(info.value)
    assert "run code" in message and "safetensors" in message and str(path) in message
    assert not marker.exists()


def test_refuses_pickled_object(tmp_path):
    path = tmp_path / "object.pt"
    path.write_bytes(pickle.dumps(CheckpointError("just an object")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="not a plain state dict"):
            read_state_dict(path)


def test_truncated_file(vit_small_path, tmp_path):
    data = vit_small_path.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        anyseg.load_model(path)
    assert str(path) in str(info.value)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"this is not a safetensors file" * 4)
    with pytest.raises(CheckpointError, match="could not read safetensors file"):
        anyseg.load_model(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        anyseg.load_model(path)


def test_directory(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        read_state_dict(folder)
    with pytest.raises(FileNotFoundError, match="directory"):
        anyseg.load_model(str(folder))


def test_missing_path(tmp_path):
    path = tmp_path / "nothing_here.pth"
    with pytest.raises(FileNotFoundError, match="nothing_here.pth"):
        anyseg.load_model(path)
    with pytest.raises(FileNotFoundError, match="nothing_here.pth"):
        anyseg.load_model(str(path))
    with pytest.raises(FileNotFoundError, match="nothing_here.pth"):
        read_state_dict(path)


def test_foreign_state_dict(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint") as info:
        anyseg.load_model(path)
    assert "weight" in str(info.value)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        anyseg.load_model(path)


def test_missing_keys_are_listed(golden_state_dicts, tmp_path):
    sd = dict(golden_state_dicts["vit_small"])
    removed = ["mask_decoder.output_upscaling.0.bias", "image_encoder.blocks.2.norm1.weight"]
    for key in removed:
        del sd[key]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(2\)") as info:
        anyseg.load_model(path)
    message = str(info.value)
    assert all(key in message for key in removed)
    assert "unexpected keys" not in message and "mis-shaped" not in message


def test_key_needed_for_inference_missing(golden_state_dicts):
    sd = dict(golden_state_dicts["vit_small"])
    del sd["mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match="mask_decoder.iou_token.weight"):
        model_from_state_dict(sd)


def test_unexpected_key_is_listed(golden_state_dicts):
    sd = dict(golden_state_dicts["vit_small"])
    sd["mask_decoder.extra_head.weight"] = torch.zeros(4)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\)") as info:
        model_from_state_dict(sd, source="extra.pth")
    message = str(info.value)
    assert "mask_decoder.extra_head.weight" in message and "extra.pth" in message
    assert "missing keys" not in message


def test_misshaped_key_is_listed(golden_state_dicts):
    sd = dict(golden_state_dicts["vit_small"])
    key = "mask_decoder.output_upscaling.0.weight"
    want_shape = tuple(sd[key].shape)
    sd[key] = torch.zeros(want_shape[0], want_shape[1] + 1, *want_shape[2:])
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \(1\)") as info:
        model_from_state_dict(sd)
    message = str(info.value)
    assert key in message and str(want_shape) in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_all_problems_in_one_message(golden_state_dicts):
    sd = dict(golden_state_dicts["vit_small"])
    del sd["image_encoder.neck.1.bias"]
    sd["surplus"] = torch.zeros(1)
    sd["mask_decoder.iou_prediction_head.layers.2.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as info:
        model_from_state_dict(sd)
    message = str(info.value)
    for part in ("missing keys (1)", "image_encoder.neck.1.bias", "unexpected keys (1)", "surplus",
                 "mis-shaped keys (1)", "mask_decoder.iou_prediction_head.layers.2.bias"):
        assert part in message


def test_non_tensor_value(golden_state_dicts, tmp_path):
    sd = dict(golden_state_dicts["vit_small"])
    sd["mask_decoder.note"] = 3
    path = tmp_path / "non_tensor.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="only tensors") as info:
        anyseg.load_model(path)
    assert "mask_decoder.note" in str(info.value)


def test_registry_name_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSEG_HOME", str(tmp_path))
    monkeypatch.setenv("ANYSEG_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="ANYSEG_OFFLINE") as info:
        anyseg.load_model("vit_b")
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message
    assert str(tmp_path / "checkpoints" / "sam_vit_b_01ec64.pth") in message
    assert "https://" in message
