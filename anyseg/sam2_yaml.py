"""SAM 2 configurations in the reference's YAML format (the ``model:`` tree of ``sam2.1_hiera_t.yaml``).

Two ways to name a configuration, as the reference builders take them:

* a public config name -- ``configs/sam2.1/sam2.1_hiera_t.yaml``, ``sam2.1_hiera_t.yaml``,
  ``sam2.1_hiera_t``, ``sam2_hiera_b+`` or a long name such as ``sam2.1_hiera_base_plus`` -- gives the
  built-in public configuration (no file needed);
* a path to a ``.yaml`` file is read.

Only the numbers and flags are read; ``_target_`` strings are ignored (nothing is ever imported from
them). Sam2Config's field names are the reference's yaml names, so model-level flags map by name.
A setting the file leaves out takes the value the reference code gives it: the Hiera defaults for the
trunk (stages 2,3,16,3, global blocks 12,16,20, windows 8,4,14,7, 14x14 background -- the public b+ yaml
relies on them), ``false`` for the 2.1-only flags, the mask decoder's defaults (no dynamic multimask
fallback unless the builders' post-processing overrides switch it on). Other model flags left out take
the public configs' values. Settings anyseg does not implement differently from the public models
(e.g. a bilinear FPN, another activation) are refused with a message rather than ignored.

Hydra-style overrides (``++model.fill_hole_area=8``, ``model.image_encoder.trunk.embed_dim=16``) are
applied to the tree before it is read; the builders' post-processing is expressed with them, as in the
reference (:data:`IMAGE_POSTPROCESSING`, :data:`VIDEO_POSTPROCESSING`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .config_sam2 import (SAM2_VARIANTS, HieraConfig, MemoryAttentionConfig, MemoryEncoderConfig, NeckConfig,
                          Sam2Config)

__all__ = ["ConfigError", "IMAGE_POSTPROCESSING", "VIDEO_POSTPROCESSING", "HIERA_DEFAULTS", "public_config_name", "yaml_base",
           "load_sam2_config", "read_sam2_yaml", "sam2_config_from_tree", "parse_overrides"]

ConfigSource = Union[str, os.PathLike]


class ConfigError(ValueError):
    """A SAM 2 configuration (file, name or override) that cannot be read or is not supported."""


#: What the reference ``build_sam2`` adds with ``apply_postprocessing=True`` (spec 9.9).
IMAGE_POSTPROCESSING: Tuple[str, ...] = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)
#: What ``build_sam2_video_predictor`` adds with ``apply_postprocessing=True``.
VIDEO_POSTPROCESSING: Tuple[str, ...] = IMAGE_POSTPROCESSING + (
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
)

#: The reference Hiera constructor's defaults (what a yaml that leaves trunk settings out gets).
HIERA_DEFAULTS = HieraConfig(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                             window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(14, 14))

_SIZES = {"t": "t", "tiny": "t", "s": "s", "small": "s", "b+": "b+", "base_plus": "b+", "b_plus": "b+",
          "base+": "b+", "l": "l", "large": "l"}
_NAME = re.compile(r"^(sam2|sam2\.1)_hiera_(.+)$")


def public_config_name(name: str) -> Optional[str]:
    """The :data:`~anyseg.config_sam2.SAM2_VARIANTS` key of a public config name, or None.

    Accepts the reference's config paths and names with or without directories and ``.yaml``:
    ``configs/sam2.1/sam2.1_hiera_t.yaml``, ``sam2_hiera_b+.yaml``, ``sam2.1_hiera_t``,
    ``sam2.1_hiera_base_plus``, ``sam2.1-hiera-tiny``.
    """
    base = re.split(r"[\\/]", str(name).strip())[-1].lower()
    for suffix in (".yaml", ".yml"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    match = _NAME.match(base.replace("-", "_"))
    if not match or match.group(2) not in _SIZES:
        return None
    return f"{match.group(1)}_hiera_{_SIZES[match.group(2)]}"


# ------------------------------------------------------------------------------------------ values
_MISSING = object()


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _coerce(value: Any, like: Any, where: str) -> Any:
    """``value`` as the type of ``like`` (a field's current value); ConfigError when it cannot be."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(like, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(like, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(like, str):
        if isinstance(value, str):
            return value
    elif isinstance(like, tuple):
        if isinstance(value, (list, tuple)):
            element = like[0] if like else 0
            return tuple(_coerce(v, element, f"{where}[{i}]") for i, v in enumerate(value))
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list"}
    raise ConfigError(f"{where} must be {kinds.get(type(like), type(like).__name__)}, got {_describe(value)}")


class _Tree:
    """One mapping of the yaml tree: typed reads, checked constants, and a list of keys not read."""

    def __init__(self, data: Any, path: str, source: str, root: Mapping) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {path} must be a mapping, got {_describe(data)}")
        self.data, self.path, self.source, self.root = data, path, source, root
        self.read = {"_target_"}

    def where(self, key: str) -> str:
        return f"{self.source}: {self.path}.{key}"

    def raw(self, key: str) -> Any:
        self.read.add(key)
        value = self.data.get(key, _MISSING)
        return _interpolate(value, self.root, self.where(key))

    def get(self, key: str, like: Any) -> Any:
        """The value of ``key`` as the type of ``like``; ``like`` itself when the key is absent."""
        value = self.raw(key)
        if value is _MISSING:
            return like
        if value is None:
            raise ConfigError(f"{self.where(key)} is null; give a value or leave the setting out")
        return _coerce(value, like, self.where(key))

    def child(self, key: str) -> "_Tree":
        return _Tree(self.raw(key) if key in self.data else None, f"{self.path}.{key}", self.source, self.root)

    def expect(self, key: str, supported: Any, why: str = "") -> None:
        """A setting anyseg implements only with one value (the public models' value)."""
        value = self.raw(key)
        if value is _MISSING:
            return
        number = (int, float)
        if (isinstance(supported, number) and not isinstance(supported, bool) and isinstance(value, number)
                and not isinstance(value, bool)):
            ok = math.isclose(float(value), float(supported))
        elif isinstance(supported, tuple) and isinstance(value, (list, tuple)):
            ok = tuple(value) == supported
        else:
            ok = value == supported and type(value) is type(supported)
        if not ok:
            raise ConfigError(f"{self.where(key)} = {_describe(value)} is not supported; anyseg implements "
                              f"{_describe(supported)} (the value of every public SAM 2 config){why}")

    def ignore(self, *keys: str) -> None:
        self.read.update(keys)

    def unread(self) -> List[str]:
        return [f"{self.path}.{k}" for k in self.data if k not in self.read]


_INTERP = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def _interpolate(value: Any, root: Mapping, where: str) -> Any:
    """Resolve a whole-value ``${a.b.c}`` reference (as in the reference's training configs)."""
    if not isinstance(value, str):
        return value
    match = _INTERP.match(value.strip())
    if not match:
        if "${" in value:
            raise ConfigError(f"{where}: cannot resolve {value!r} (only whole-value ${{a.b}} references are read)")
        return value
    node: Any = root
    for part in match.group(1).split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{where}: {value!r} refers to a setting that is not in the file")
        node = node[part]
    return _interpolate(node, root, where)


# ------------------------------------------------------------------------------------------ trees
def _trunk(tree: _Tree, base: HieraConfig) -> HieraConfig:
    trunk = replace(
        base,
        embed_dim=tree.get("embed_dim", base.embed_dim),
        num_heads=tree.get("num_heads", base.num_heads),
        stages=tree.get("stages", base.stages),
        global_att_blocks=tree.get("global_att_blocks", base.global_att_blocks),
        window_spec=tree.get("window_spec", base.window_spec),
        window_pos_embed_bkg_spatial_size=tree.get("window_pos_embed_bkg_spatial_size",
                                                   base.window_pos_embed_bkg_spatial_size),
        q_pool=tree.get("q_pool", base.q_pool),
        q_stride=tree.get("q_stride", base.q_stride),
        dim_mul=tree.get("dim_mul", base.dim_mul),
        head_mul=tree.get("head_mul", base.head_mul),
        mlp_ratio=tree.get("mlp_ratio", base.mlp_ratio),
    )
    tree.expect("return_interm_layers", True)
    # Training-time settings (stochastic depth, initial weights): no effect on a loaded model.
    tree.ignore("drop_path_rate", "weights_path")
    where = f"{tree.source}: {tree.path}"
    if len(trunk.window_spec) != len(trunk.stages):
        raise ConfigError(f"{where}: window_spec {list(trunk.window_spec)} needs one window per stage "
                          f"(stages {list(trunk.stages)})")
    if len(trunk.window_pos_embed_bkg_spatial_size) != 2:
        raise ConfigError(f"{where}: window_pos_embed_bkg_spatial_size must be two numbers")
    bad = [b for b in trunk.global_att_blocks if not 0 <= b < trunk.depth]
    if bad:
        raise ConfigError(f"{where}: global_att_blocks {bad} outside the {trunk.depth} blocks (0..{trunk.depth - 1})")
    if any(s < 1 for s in trunk.stages) or trunk.embed_dim < 1 or trunk.num_heads < 1:
        raise ConfigError(f"{where}: stages, embed_dim and num_heads must be positive")
    return trunk


def _neck(tree: _Tree, base: NeckConfig, trunk: HieraConfig, trunk_given: bool, scalp: int) -> NeckConfig:
    d_model = tree.get("d_model", base.d_model)
    channels = trunk.channel_list if trunk_given and "backbone_channel_list" not in tree.data else \
        base.backbone_channel_list
    neck = replace(base, d_model=d_model, backbone_channel_list=tree.get("backbone_channel_list", channels),
                   fpn_top_down_levels=tree.get("fpn_top_down_levels", base.fpn_top_down_levels),
                   fpn_interp_model=tree.get("fpn_interp_model", base.fpn_interp_model), scalp=scalp)
    tree.expect("fpn_interp_model", "nearest")
    tree.expect("fuse_type", "sum")
    tree.expect("kernel_size", 1)
    tree.expect("stride", 1)
    tree.expect("padding", 0)
    _sine(tree.child("position_encoding"), d_model)
    return neck


def _sine(tree: _Tree, channels: int) -> None:
    tree.expect("num_pos_feats", channels, " (it must equal the feature width)")
    tree.expect("normalize", True)
    tree.expect("temperature", 10000)
    if tree.data.get("scale") is not None:  # null means 2*pi when normalising
        tree.expect("scale", 2 * math.pi)
    tree.ignore("scale")
    _finish(tree)


def _attention(tree: _Tree, d_model: int) -> Dict[str, Any]:
    tree.expect("embedding_dim", d_model, " (it must equal d_model)")
    tree.expect("downsample_rate", 1)
    tree.ignore("dropout")
    found = {key: tree.raw(key) for key in ("num_heads", "rope_theta", "feat_sizes", "kv_in_dim", "rope_k_repeat")}
    _finish(tree)
    return {k: v for k, v in found.items() if v is not _MISSING}


def _memory_attention(tree: _Tree, base: MemoryAttentionConfig) -> MemoryAttentionConfig:
    d_model = tree.get("d_model", base.d_model)
    config = replace(base, d_model=d_model, num_layers=tree.get("num_layers", base.num_layers),
                     pos_enc_at_input=tree.get("pos_enc_at_input", base.pos_enc_at_input))
    layer = tree.child("layer")
    layer.expect("d_model", d_model, " (it must equal memory_attention.d_model)")
    layer.expect("activation", "relu")
    layer.expect("pos_enc_at_attn", False)
    layer.expect("pos_enc_at_cross_attn_keys", True)
    layer.expect("pos_enc_at_cross_attn_queries", False)
    layer.ignore("dropout")
    config = replace(config, dim_feedforward=layer.get("dim_feedforward", config.dim_feedforward))
    self_attn = _attention(layer.child("self_attention"), d_model)
    cross = _attention(layer.child("cross_attention"), d_model)
    _finish(layer)
    if self_attn.pop("kv_in_dim", d_model) != d_model:
        raise ConfigError(f"{tree.source}: {tree.path}.layer.self_attention.kv_in_dim must equal d_model")
    if self_attn.pop("rope_k_repeat", False) is not False:
        raise ConfigError(f"{tree.source}: {tree.path}.layer.self_attention.rope_k_repeat is not supported")
    if cross.pop("rope_k_repeat", True) is not True:
        raise ConfigError(f"{tree.source}: {tree.path}.layer.cross_attention.rope_k_repeat must be true "
                          "(spatial memories share the query grid's positions)")
    where = f"{tree.source}: {tree.path}.layer.cross_attention"
    kv = cross.pop("kv_in_dim", _MISSING)
    if kv is not _MISSING:
        config = replace(config, kv_in_dim=_coerce(kv, config.kv_in_dim, f"{where}.kv_in_dim"))
    for key, like in (("num_heads", config.num_heads), ("rope_theta", config.rope_theta),
                      ("feat_sizes", config.feat_sizes)):
        values = {name: _coerce(v[key], like, f"{tree.source}: {tree.path}.layer.{name}.{key}")
                  for name, v in (("self_attention", self_attn), ("cross_attention", cross)) if key in v}
        if len(set(values.values())) > 1:
            raise ConfigError(f"{tree.source}: {tree.path}.layer: self_attention and cross_attention differ in "
                              f"{key} ({values}); anyseg uses one value for both")
        if values:
            config = replace(config, **{key: next(iter(values.values()))})
    return config


def _memory_encoder(tree: _Tree, base: MemoryEncoderConfig) -> MemoryEncoderConfig:
    out_dim = tree.get("out_dim", base.out_dim)
    in_dim = tree.get("in_dim", base.in_dim)
    config = replace(base, out_dim=out_dim, in_dim=in_dim)
    _sine(tree.child("position_encoding"), out_dim)
    down = tree.child("mask_downsampler")
    down.expect("kernel_size", 3)
    down.expect("stride", 2)
    down.expect("padding", 1)
    down.expect("embed_dim", in_dim, " (it must equal memory_encoder.in_dim)")
    config = replace(config, mask_downsample_stride=down.get("total_stride", config.mask_downsample_stride))
    _finish(down)
    fuser = tree.child("fuser")
    config = replace(config, fuser_num_layers=fuser.get("num_layers", config.fuser_num_layers))
    fuser.expect("input_projection", False)
    fuser.ignore("dim")  # only used with an input projection
    block = fuser.child("layer")
    block.expect("dim", in_dim, " (it must equal memory_encoder.in_dim)")
    block.expect("use_dwconv", True)
    block.ignore("layer_scale_init_value", "drop_path")  # gamma comes from the checkpoint
    kernel = block.get("kernel_size", config.kernel_size)
    block.expect("padding", kernel // 2, " (kernel_size // 2: the fuser keeps the grid size)")
    config = replace(config, kernel_size=kernel)
    _finish(block)
    _finish(fuser)
    return config


def _finish(tree: _Tree) -> None:
    extra = tree.unread()
    if extra:
        raise ConfigError(f"{tree.source}: unknown setting(s) {', '.join(extra)}; anyseg cannot tell what they "
                          "would change, so it does not ignore them")


#: Sam2Config fields a yaml may set at the model level (everything that is not a sub-config).
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(Sam2Config)
                      if f.name not in ("trunk", "neck", "memory_attention", "memory_encoder", "version"))
_DECODER_EXTRA = ("dynamic_multimask_via_stability", "dynamic_multimask_stability_delta",
                  "dynamic_multimask_stability_thresh")
# Reference settings without an effect on what anyseg computes.
_MODEL_IGNORED = ("compile_image_encoder",)
_VERSION_21_ONLY = ("no_obj_embed_spatial", "proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs")


def yaml_base() -> Sam2Config:
    """What a yaml file that sets nothing describes: reference code defaults where the spec states them
    (Hiera's, the 2.1-only flags off, no dynamic multimask fallback), the public values elsewhere."""
    config = Sam2Config(trunk=HIERA_DEFAULTS, neck=NeckConfig(backbone_channel_list=HIERA_DEFAULTS.channel_list))
    return replace(config, dynamic_multimask_via_stability=False, **{k: False for k in _VERSION_21_ONLY})


def sam2_config_from_tree(tree: Mapping, *, base: Optional[Sam2Config] = None, source: str = "config") -> Sam2Config:
    """A :class:`Sam2Config` from a parsed yaml document (with a ``model:`` key, or the model tree itself).

    Settings absent from the tree keep the values of ``base`` (default :func:`yaml_base`).
    """
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'model' entry, got {_describe(tree)}")
    root = tree
    if "model" in tree:
        model_tree, path = tree["model"], "model"
    elif isinstance(tree.get("trainer"), Mapping) and "model" in tree["trainer"]:
        model_tree, path = tree["trainer"]["model"], "trainer.model"  # the reference's training configs
    else:
        raise ConfigError(f"{source}: no 'model:' entry; expected a SAM 2 config in the reference's format "
                          f"(like configs/sam2.1/sam2.1_hiera_t.yaml), found keys {sorted(map(str, tree))}")
    model = _Tree(model_tree, path, source, root)
    config = base or yaml_base()

    encoder = model.child("image_encoder")
    trunk_tree = encoder.child("trunk")
    trunk = _trunk(trunk_tree, config.trunk)
    _finish(trunk_tree)
    scalp = encoder.get("scalp", config.neck.scalp)
    neck_tree = encoder.child("neck")
    neck = _neck(neck_tree, config.neck, trunk, "trunk" in encoder.data, scalp)
    _finish(neck_tree)
    _finish(encoder)
    memory_attention = _memory_attention(model.child("memory_attention"), config.memory_attention)
    mem_tree = model.child("memory_encoder")
    memory_encoder = _memory_encoder(mem_tree, config.memory_encoder)
    _finish(mem_tree)

    values: Dict[str, Any] = {name: model.get(name, getattr(config, name)) for name in _MODEL_FIELDS
                              if name in model.data}
    extra = model.child("sam_mask_decoder_extra_args")
    for name in _DECODER_EXTRA:
        values[name] = extra.get(name, values.get(name, getattr(config, name)))
    _finish(extra)
    model.ignore(*_MODEL_IGNORED)
    if "mem_dim" not in values:
        values["mem_dim"] = memory_encoder.out_dim
    config = replace(config, trunk=trunk, neck=neck, memory_attention=memory_attention,
                     memory_encoder=memory_encoder, **values)
    config = replace(config, version="2.1" if config.add_tpos_enc_to_obj_ptrs and config.proj_tpos_enc_in_obj_ptrs
                     else "2.0")
    unknown = model.unread()
    if unknown:
        warnings.warn(f"{source}: ignored model settings anyseg does not know: {', '.join(unknown)}", stacklevel=3)
    return config


# ------------------------------------------------------------------------------------------ overrides
_OVERRIDE = re.compile(r"^\+{0,2}(model(?:\.[A-Za-z0-9_]+)+)=(.*)$", re.S)


def parse_overrides(overrides: Iterable[str]) -> Dict[str, Any]:
    """Hydra-style ``[++]model.a.b=value`` strings -> a nested ``{"model": {...}}`` tree (later wins)."""
    import yaml

    tree: Dict[str, Any] = {}
    for text in overrides:
        match = _OVERRIDE.match(str(text).strip())
        if not match:
            raise ConfigError(f"unsupported override {text!r}: expected 'model.<setting>=<value>' (optionally "
                              "with a leading + or ++)")
        path, raw = match.group(1).split("."), match.group(2)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {text!r}: cannot read the value {raw!r} ({exc})") from exc
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return tree


def _merge(into: Dict[str, Any], new: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(into)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ entry points
def read_sam2_yaml(path: ConfigSource, overrides: Sequence[str] = ()) -> Sam2Config:
    """Read a config file in the reference's format (and apply ``overrides``)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read SAM 2 config {path}: {exc}") from exc
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if tree is None:
        raise ConfigError(f"{path} is empty; expected a SAM 2 config with a 'model:' entry")
    if overrides and isinstance(tree, Mapping):
        patch = parse_overrides(overrides)
        key = "model" if "model" in tree or "trainer" not in tree else None
        if key:
            tree = _merge(dict(tree), patch)
        else:
            tree = _merge(dict(tree), {"trainer": patch})
    return sam2_config_from_tree(tree, source=str(path))


def load_sam2_config(config_file: Union[ConfigSource, Sam2Config], overrides: Sequence[str] = ()) -> Sam2Config:
    """A config from a public config name or a yaml file, with hydra-style ``overrides`` applied.

    A public name gives the public configuration as its yaml describes it (no post-processing: add
    :data:`IMAGE_POSTPROCESSING` / :data:`VIDEO_POSTPROCESSING` as the builders do). A path to an existing
    file is read.

    Raises:
        ConfigError: an unreadable or unsupported config or override.
        FileNotFoundError: neither an existing file nor a public config name.
    """
    if isinstance(config_file, Sam2Config):
        if not overrides:
            return config_file
        return sam2_config_from_tree(parse_overrides(overrides), base=config_file, source="overrides")
    path = Path(config_file).expanduser()
    if path.is_file():
        return read_sam2_yaml(path, overrides)
    name = public_config_name(os.fspath(config_file))
    if name is None:
        known = ", ".join(f"configs/{'sam2.1' if k.startswith('sam2.1') else 'sam2'}/{k}.yaml"
                          for k in SAM2_VARIANTS)
        raise FileNotFoundError(f"SAM 2 config {os.fspath(config_file)!r} is neither an existing file nor a public "
                                f"config name (known: {known})")
    raw = replace(SAM2_VARIANTS[name], dynamic_multimask_via_stability=False)
    if not overrides:
        return raw
    return sam2_config_from_tree(parse_overrides(overrides), base=raw, source=f"overrides of {name}")
