"""SAM 2 / 2.1 checkpoints: config inference from keys and shapes, reference YAML configs, loading, the
builders and the registry names (spec/sam2.md section 11, golden/sam2/README.md)."""
from __future__ import annotations

import shutil
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

import anyseg
from anyseg import hub
from anyseg.checkpoint import CheckpointError, read_state_dict, save_model
from anyseg.config_sam2 import HIERA, SAM2_VARIANTS, Sam2Config
from anyseg.modeling.sam2 import Sam2, build_sam2_model
from anyseg.sam2_checkpoint import (infer_sam2_config, is_sam2_state_dict, load_sam2_model,
                                    sam2_model_from_state_dict)
from anyseg.sam2_yaml import (IMAGE_POSTPROCESSING, ConfigError, load_sam2_config, public_config_name,
                              read_sam2_yaml)

# spec 11.1 "Numbers in the state dict": (values, entries) per size and version.
SPEC_NUMBERS = {
    "sam2_hiera_t": (38_946_242, 468), "sam2.1_hiera_t": (38_962_754, 471),
    "sam2_hiera_s": (46_044_098, 516), "sam2.1_hiera_s": (46_060_610, 519),
    "sam2_hiera_b+": (80_833_922, 612), "sam2.1_hiera_b+": (80_850_434, 615),
    "sam2_hiera_l": (224_430_386, 900), "sam2.1_hiera_l": (224_446_898, 903),
}
DROP_21 = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias")


def meta_state_dict(config: Sam2Config) -> dict:
    with torch.device("meta"):
        model = build_sam2_model(config)
    return model.state_dict()


@pytest.fixture(scope="module")
def sam2_dir(golden_dir):
    path = golden_dir / "sam2"
    if not path.is_dir():
        pytest.skip(f"SAM 2 golden data not found at {path}")
    return path


@pytest.fixture(scope="module")
def golden_sd(sam2_dir):
    return read_state_dict(sam2_dir / "sam2.1_golden.pt")


@pytest.fixture(scope="module")
def golden_model(sam2_dir):
    return anyseg.load_model(sam2_dir / "sam2.1_golden.pt")


@pytest.fixture
def sam20_file(tmp_path, golden_sd):
    """The derived SAM 2.0 golden file (README: drop the three 2.1 keys), without its yaml yet."""
    path = tmp_path / "sam2.0_golden.pt"
    torch.save({"model": {k: v for k, v in golden_sd.items() if k not in DROP_21}}, path)
    return path


# ------------------------------------------------------------------------------ public configurations
@pytest.mark.parametrize("name", sorted(SAM2_VARIANTS))
def test_public_config_inferred_exactly_and_sizes_match_spec(name):
    config = SAM2_VARIANTS[name]
    sd = meta_state_dict(config)
    values, entries = SPEC_NUMBERS[name]
    assert len(sd) == entries
    assert sum(v.numel() for v in sd.values()) == values
    assert is_sam2_state_dict(sd)
    assert infer_sam2_config(sd) == config
    # The public config name as an explicit config agrees with the keys and gives the same config.
    assert infer_sam2_config(sd, yaml_config=name) == config


def test_public_name_for_another_size_lists_every_disagreement():
    sd = meta_state_dict(SAM2_VARIANTS["sam2.1_hiera_s"])
    with pytest.raises(CheckpointError) as info:
        infer_sam2_config(sd, yaml_config="configs/sam2.1/sam2.1_hiera_t.yaml")
    text = str(info.value)
    assert "image_encoder.trunk.stages: config [1, 2, 7, 2], checkpoint [1, 2, 11, 2]" in text
    assert "embed_dim" not in text  # t and s share the width: only what differs is listed


def test_version_flags_follow_the_keys():
    sd = meta_state_dict(SAM2_VARIANTS["sam2.1_hiera_t"])
    without_tpos = {k: v for k, v in sd.items() if not k.startswith("obj_ptr_tpos_proj.")}
    config = infer_sam2_config(without_tpos)
    assert config.version == "2.0" and config.no_obj_embed_spatial  # that key is still there
    assert not (config.add_tpos_enc_to_obj_ptrs or config.proj_tpos_enc_in_obj_ptrs
                or config.use_signed_tpos_enc_to_obj_ptrs)


def test_linear_heads_and_other_memory_sizes_are_read_from_the_keys():
    config = replace(SAM2_VARIANTS["sam2.1_hiera_t"], pred_obj_scores_mlp=False, use_mlp_for_obj_ptr_proj=False,
                     num_maskmem=5)
    config = replace(config, memory_attention=replace(config.memory_attention, num_layers=3, dim_feedforward=1024),
                     memory_encoder=replace(config.memory_encoder, fuser_num_layers=1))
    assert infer_sam2_config(meta_state_dict(config)) == config


def test_not_sam2_and_incomplete_state_dicts():
    with pytest.raises(CheckpointError, match="not a SAM 2 checkpoint"):
        infer_sam2_config({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)})
    sd = meta_state_dict(SAM2_VARIANTS["sam2.1_hiera_t"])
    del sd["image_encoder.trunk.pos_embed"]
    with pytest.raises(CheckpointError, match="image_encoder.trunk.pos_embed"):
        infer_sam2_config(sd)


# ------------------------------------------------------------------------------------------ YAML
def test_golden_yamls_read_as_the_readme_says(sam2_dir):
    c21 = read_sam2_yaml(sam2_dir / "sam2.1_golden.yaml")
    c20 = read_sam2_yaml(sam2_dir / "sam2.0_golden.yaml")
    trunk = c21.trunk
    assert (trunk.embed_dim, trunk.num_heads, trunk.stages, trunk.global_att_blocks, trunk.window_spec,
            trunk.window_pos_embed_bkg_spatial_size) == (16, 1, (1, 2, 3, 2), (4,), (8, 4, 14, 7), (7, 7))
    assert c21.neck.backbone_channel_list == (128, 64, 32, 16)
    assert (c21.memory_attention.num_layers, c21.memory_attention.dim_feedforward) == (2, 512)
    assert c21.memory_encoder.fuser_num_layers == 1 and c21.mem_dim == 64
    assert c21.version == "2.1" and c21.no_obj_embed_spatial and c21.use_signed_tpos_enc_to_obj_ptrs
    assert c20.version == "2.0" and not (c20.no_obj_embed_spatial or c20.add_tpos_enc_to_obj_ptrs
                                         or c20.proj_tpos_enc_in_obj_ptrs or c20.use_signed_tpos_enc_to_obj_ptrs)
    # No sam_mask_decoder_extra_args in the file: the fallback is off until the builders' overrides.
    assert not c21.dynamic_multimask_via_stability
    built = load_sam2_config(sam2_dir / "sam2.1_golden.yaml", IMAGE_POSTPROCESSING)
    assert built.dynamic_multimask_via_stability
    assert replace(built, trunk=HIERA["t"], neck=SAM2_VARIANTS["sam2.1_hiera_t"].neck,
                   memory_attention=Sam2Config().memory_attention,
                   memory_encoder=Sam2Config().memory_encoder) == SAM2_VARIANTS["sam2.1_hiera_t"]


@pytest.mark.parametrize("name, key", [
    ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_t"),
    ("sam2.1_hiera_t.yaml", "sam2.1_hiera_t"),
    ("sam2.1_hiera_t", "sam2.1_hiera_t"),
    ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_b+"),
    ("sam2_hiera_s", "sam2_hiera_s"),
    ("sam2.1_hiera_base_plus", "sam2.1_hiera_b+"),
    ("sam2.1-hiera-large", "sam2.1_hiera_l"),
])
def test_public_config_names(name, key):
    assert public_config_name(name) == key
    assert load_sam2_config(name, IMAGE_POSTPROCESSING) == SAM2_VARIANTS[key]


def test_unknown_config_name():
    assert public_config_name("sam2.1_hiera_xl") is None
    with pytest.raises(FileNotFoundError, match="configs/sam2.1/sam2.1_hiera_t.yaml"):
        load_sam2_config("sam2.1_hiera_xl")


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_bplus_yaml_relies_on_hiera_defaults_and_targets_are_not_imported(tmp_path):
    # The public b+ yaml only gives embed_dim and num_heads; a _target_ is never imported.
    path = _write(tmp_path, """\
        model:
          _target_: os.system
          image_encoder:
            _target_: does.not.exist
            trunk:
              _target_: sam2.modeling.backbones.hieradet.Hiera
              embed_dim: 112
              num_heads: 2
            neck:
              backbone_channel_list: [896, 448, 224, 112]
          add_tpos_enc_to_obj_ptrs: false
        """)
    config = read_sam2_yaml(path)
    assert config.trunk == HIERA["b+"]
    assert config.version == "2.0"


def test_trunk_channel_list_defaults_to_the_trunk_widths(tmp_path):
    path = _write(tmp_path, "model:\n  image_encoder:\n    trunk:\n      embed_dim: 16\n      stages: [1, 1, 1, 1]\n"
                            "      global_att_blocks: [3]\n")
    assert read_sam2_yaml(path).neck.backbone_channel_list == (128, 64, 32, 16)


@pytest.mark.parametrize("text, message", [
    ("model:\n  image_encoder:\n    trunk:\n      embed_dims: 16\n", "embed_dims"),
    ("model:\n  image_encoder:\n    neck:\n      fpn_interp_model: bilinear\n", "fpn_interp_model"),
    ("model:\n  memory_attention:\n    layer:\n      activation: gelu\n", "activation"),
    ("model:\n  num_maskmem: seven\n", "num_maskmem must be an integer"),
    ("model:\n  image_encoder:\n    trunk:\n      stages: [1, 2]\n", "window_spec"),
    ("trainer:\n  max_epochs: 3\n", "no 'model:' entry"),
    ("model: [\n", "not valid YAML"),
])
def test_yaml_errors_name_the_setting(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read_sam2_yaml(_write(tmp_path, text))


def test_unknown_model_level_setting_warns(tmp_path):
    with pytest.warns(UserWarning, match="prob_to_use_pt_input_for_train"):
        read_sam2_yaml(_write(tmp_path, "model:\n  prob_to_use_pt_input_for_train: 0.5\n"))


def test_overrides_and_interpolation(tmp_path):
    config = load_sam2_config("sam2.1_hiera_t", ["++model.fill_hole_area=8", "model.image_encoder.trunk.num_heads=2",
                                                 "+model.memory_attention.layer.dim_feedforward=1024"])
    assert (config.fill_hole_area, config.trunk.num_heads, config.memory_attention.dim_feedforward) == (8, 2, 1024)
    assert config.trunk.stages == HIERA["t"].stages
    with pytest.raises(ConfigError, match="unsupported override"):
        load_sam2_config("sam2.1_hiera_t", ["trainer.max_epochs=3"])
    path = _write(tmp_path, "scratch:\n  resolution: 512\ntrainer:\n  model:\n    image_size: ${scratch.resolution}\n")
    assert read_sam2_yaml(path).image_size == 512


# ------------------------------------------------------------------------------------------ golden files
def test_golden_loads_with_the_yaml_beside_it(golden_model, golden_sd):
    assert isinstance(golden_model, Sam2) and not golden_model.training
    config = golden_model.config
    assert config.version == "2.1" and config.trunk.global_att_blocks == (4,)
    assert config.dynamic_multimask_via_stability  # as the builders make it
    assert all(torch.equal(v, golden_sd[k]) for k, v in golden_model.state_dict().items())


def test_build_sam2_takes_the_yaml_explicitly(sam2_dir, golden_model):
    model = anyseg.build_sam2(str(sam2_dir / "sam2.1_golden.yaml"), str(sam2_dir / "sam2.1_golden.pt"))
    assert model.config == golden_model.config and not model.training
    assert torch.equal(model.no_obj_embed_spatial, golden_model.no_obj_embed_spatial)
    raw = anyseg.build_sam2(str(sam2_dir / "sam2.1_golden.yaml"), apply_postprocessing=False)  # random init
    assert raw.config == replace(golden_model.config, dynamic_multimask_via_stability=False)


def test_derived_sam20_file_infers_20(sam2_dir, sam20_file):
    with pytest.raises(CheckpointError) as info:  # no yaml beside it yet
        anyseg.load_model(sam20_file)
    text = str(info.value)
    for needed in ("num_heads", "global_att_blocks", "window_spec", "sam2.0_golden.yaml"):
        assert needed in text
    shutil.copy(sam2_dir / "sam2.0_golden.yaml", sam20_file.with_suffix(".yaml"))
    model = anyseg.load_model(sam20_file)
    assert model.config.version == "2.0" and not model.config.no_obj_embed_spatial
    assert not hasattr(model, "no_obj_embed_spatial")
    video = load_sam2_model(sam20_file, video=True)
    assert video.config == model.config.for_video()


def test_yaml_of_the_other_version_is_refused(sam2_dir, golden_sd):
    with pytest.raises(CheckpointError) as info:
        infer_sam2_config(golden_sd, yaml_config=sam2_dir / "sam2.0_golden.yaml")
    assert "no_obj_embed_spatial: config false, checkpoint true" in str(info.value)


def test_wrong_missing_and_extra_keys_are_all_listed(sam2_dir, golden_sd):
    sd = dict(golden_sd)
    del sd["memory_encoder.pix_feat_proj.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["sam_mask_decoder.conv_s0.bias"] = torch.zeros(33)
    with pytest.raises(CheckpointError) as info:
        sam2_model_from_state_dict(sd, config=sam2_dir / "sam2.1_golden.yaml", source="broken.pt")
    text = str(info.value)
    assert "broken.pt" in text
    assert "missing keys (1):\n    memory_encoder.pix_feat_proj.bias" in text
    assert "unexpected keys (1):\n    extra.weight" in text
    assert "sam_mask_decoder.conv_s0.bias: file (33,) vs model (32,)" in text


def test_safetensors_round_trip(tmp_path, sam2_dir, golden_model):
    path = save_model(golden_model, tmp_path / "custom.safetensors")
    shutil.copy(sam2_dir / "sam2.1_golden.yaml", tmp_path / "custom.yaml")
    loaded = anyseg.load_model(path)
    assert loaded.config == golden_model.config
    want = golden_model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_load_model_options_for_sam2(sam2_dir, golden_model):
    path = sam2_dir / "sam2.1_golden.pt"
    from anyseg.speed import get_config

    fast = anyseg.load_model(path, speed="lossless")
    assert get_config(fast) is not None and get_config(fast).fast_decoder
    assert get_config(anyseg.load_model(path)) is None
    model = anyseg.load_model(path, config=golden_model.config, speed="faithful", dtype=torch.float64, video=True)
    assert model.config == golden_model.config.for_video()
    assert model.no_mem_embed.dtype == torch.float64


def test_video_flag_needs_sam2(golden_dir):
    with pytest.raises(ValueError, match="SAM 2"):
        anyseg.load_model(golden_dir / "vit_small_checkpoint.pth", video=True)


def test_video_builder_settings(sam2_dir):
    predictor = anyseg.build_sam2_video_predictor(
        str(sam2_dir / "sam2.1_golden.yaml"), str(sam2_dir / "sam2.1_golden.pt"),
        hydra_overrides_extra=["++model.non_overlap_masks=true"])
    config = predictor.model.config
    assert config.fill_hole_area == 8 and config.binarize_mask_from_pts_for_mem_enc
    assert config.dynamic_multimask_via_stability and predictor.non_overlap_masks
    raw = anyseg.build_sam2_video_predictor(str(sam2_dir / "sam2.1_golden.yaml"), apply_postprocessing=False)
    assert raw.model.config.fill_hole_area == 0 and not raw.model.config.dynamic_multimask_via_stability


# ------------------------------------------------------------------------------------------ registry
OFFICIAL = {
    "sam2_hiera_t": "072824/sam2_hiera_tiny.pt", "sam2_hiera_s": "072824/sam2_hiera_small.pt",
    "sam2_hiera_b+": "072824/sam2_hiera_base_plus.pt", "sam2_hiera_l": "072824/sam2_hiera_large.pt",
    "sam2.1_hiera_t": "092824/sam2.1_hiera_tiny.pt", "sam2.1_hiera_s": "092824/sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "092824/sam2.1_hiera_base_plus.pt", "sam2.1_hiera_l": "092824/sam2.1_hiera_large.pt",
}


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSEG_HOME", str(tmp_path))
    monkeypatch.setenv("ANYSEG_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_registry_names_resolve_to_the_official_files(name, offline_home):
    info = hub.get_checkpoint_info(name)
    filename = OFFICIAL[name].split("/")[1]
    assert info.filename == filename
    assert info.url == "https://dl.fbaipublicfiles.com/segment_anything_2/" + OFFICIAL[name]
    assert info.sha256 is None and info.sha256_prefix is None
    assert public_config_name(info.config_name) == name
    assert hub.get_checkpoint_info(filename[: -len(".pt")]) == info  # the long name is an alias
    assert hub.hf_checkpoint_info(info.hf_id) == info
    with pytest.raises(FileNotFoundError) as err:
        hub.resolve_checkpoint(name)
    assert filename in str(err.value) and info.url in str(err.value)
    cached = offline_home / "checkpoints" / filename
    cached.write_bytes(b"x")
    assert hub.resolve_checkpoint(name) == cached
    assert hub.resolve_hf_id(info.hf_id) == cached


def test_hf_ids(offline_home, monkeypatch):
    assert hub.hf_checkpoint_info("facebook/sam2.1-hiera-base-plus").name == "sam2.1_hiera_b+"
    assert hub.hf_checkpoint_info("facebook/sam2-hiera-tiny").name == "sam2_hiera_t"
    with pytest.raises(ValueError, match="facebook/sam2.1-hiera-tiny"):
        hub.hf_checkpoint_info("facebook/sam9-unknown")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError) as err:
        hub.resolve_hf_id("facebook/sam2.1-hiera-small")
    text = str(err.value)
    assert "pip install huggingface_hub" in text and "sam2.1_hiera_small.pt" in text
    assert str(offline_home / "checkpoints" / "sam2.1_hiera_small.pt") in text


def test_build_sam2_hf_uses_the_table(sam2_dir, monkeypatch):
    # The hub id's config (public tiny) does not describe the golden file: the error proves the wiring.
    monkeypatch.setattr(hub, "resolve_hf_id", lambda hub_id: sam2_dir / "sam2.1_golden.pt")
    with pytest.raises(CheckpointError, match="configs/sam2.1/sam2.1_hiera_t.yaml"):
        anyseg.build_sam2_hf("facebook/sam2.1-hiera-tiny", mask_threshold=0.0)
