"""SAM 2 / 2.1 checkpoints: recognise them, infer their configuration from keys and shapes, load them.

What the keys and shapes say (spec/sam2.md 11.4) is read directly; what they cannot say -- the Hiera
heads, global-attention blocks and windows of stages 2..4, and the behavioural flags -- comes from the
public configuration whose trunk layout matches, or, for any other layout, from a config file in the
reference's YAML format: given explicitly, or found beside the checkpoint with the same stem
(``model.pt`` -> ``model.yaml``). A given config is checked against the keys, and every disagreement
is reported at once.

    from anyseg.sam2_checkpoint import load_sam2_model
    model = load_sam2_model("sam2.1_hiera_tiny.pt")              # public layout: nothing else needed
    model = load_sam2_model("custom.pt", config="custom.yaml")   # or custom.yaml beside custom.pt
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, check_keys, read_state_dict, unwrap_state_dict
from .config_sam2 import HIERA, SAM20_FLAGS, HieraConfig, NeckConfig, Sam2Config
from .sam2_yaml import IMAGE_POSTPROCESSING, load_sam2_config

__all__ = ["is_sam2_state_dict", "infer_sam2_config", "find_beside_config", "sam2_model_from_state_dict",
           "load_sam2_model"]

TRUNK = "image_encoder.trunk."
ConfigArg = Union[None, str, os.PathLike, Sam2Config]


def is_sam2_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a SAM 2 / 2.1 state dict (it has ``image_encoder.trunk.*`` or ``sam_mask_decoder.*`` keys)."""
    return any(k.startswith(TRUNK) or k.startswith("sam_mask_decoder.") for k in sd)


class _Fact(NamedTuple):
    """One thing the keys say: the setting (yaml name, for messages), its Sam2Config path, value, evidence."""

    name: str
    path: str
    value: Any
    evidence: str


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> List[int]:
    regex = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [regex.match(k)] if m})


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = _indices(sd, prefix)
    return found[-1] + 1 if found else 0


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> Optional[Tuple[int, ...]]:
    value = sd.get(key)
    return None if value is None else tuple(value.shape)


def _require(sd: Mapping[str, torch.Tensor], key: str, source: str) -> Tuple[int, ...]:
    shape = _shape(sd, key)
    if shape is None:
        raise CheckpointError(f"{source}: incomplete SAM 2 checkpoint, key {key!r} is missing "
                              f"({len(sd)} keys found)")
    return shape


def _trunk_facts(sd: Mapping[str, torch.Tensor], source: str) -> List[_Fact]:
    dim = _require(sd, TRUNK + "patch_embed.proj.weight", source)[0]
    bkg = _require(sd, TRUNK + "pos_embed", source)[2:]
    window = _require(sd, TRUNK + "pos_embed_window", source)[-1]
    depth = _count(sd, TRUNK + "blocks.")
    if depth == 0:
        raise CheckpointError(f"{source}: SAM 2 checkpoint without Hiera blocks (no {TRUNK}blocks.* keys)")
    starts = [i for i in range(depth) if TRUNK + f"blocks.{i}.proj.weight" in sd]
    bounds = [0, *starts, depth]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    facts = [
        _Fact("image_encoder.trunk.embed_dim", "trunk.embed_dim", dim, f"{TRUNK}patch_embed.proj.weight"),
        _Fact("image_encoder.trunk.stages", "trunk.stages", stages,
              f"{depth} {TRUNK}blocks, width changes (blocks.i.proj) at {starts}"),
        _Fact("image_encoder.trunk.window_pos_embed_bkg_spatial_size", "trunk.window_pos_embed_bkg_spatial_size",
              tuple(bkg), f"{TRUNK}pos_embed"),
        _Fact("image_encoder.trunk.window_spec[0]", "trunk.window_spec.0", window, f"{TRUNK}pos_embed_window"),
    ]
    if starts:
        proj = _shape(sd, TRUNK + f"blocks.{starts[0]}.proj.weight")
        facts.append(_Fact("image_encoder.trunk.dim_mul", "trunk.dim_mul", proj[0] / proj[1],
                           f"{TRUNK}blocks.{starts[0]}.proj.weight"))
    mlp = _shape(sd, TRUNK + "blocks.0.mlp.layers.0.weight")
    if mlp is not None:
        facts.append(_Fact("image_encoder.trunk.mlp_ratio", "trunk.mlp_ratio", mlp[0] / mlp[1],
                           f"{TRUNK}blocks.0.mlp.layers.0.weight"))
    return facts


def _model_facts(sd: Mapping[str, torch.Tensor]) -> List[_Fact]:
    """Neck, memory and flag settings the keys show (compared with a given config)."""
    facts: List[_Fact] = []

    def add(name: str, path: str, key: str, pick: Callable[[Tuple[int, ...]], Any]) -> None:
        shape = _shape(sd, key)
        if shape is not None:
            facts.append(_Fact(name, path, pick(shape), key))

    def count(name: str, path: str, prefix: str) -> None:
        n = _count(sd, prefix)
        if n:
            facts.append(_Fact(name, path, n, f"{prefix}* keys"))

    def flag(name: str, key: str, path: Optional[str] = None) -> None:
        facts.append(_Fact(name, path or name, key in sd, f"{key} {'present' if key in sd else 'absent'}"))

    neck = "image_encoder.neck.convs."
    levels = _count(sd, neck)
    shapes = [_shape(sd, f"{neck}{k}.conv.weight") for k in range(levels)]
    if levels and all(shapes):
        facts.append(_Fact("image_encoder.neck.backbone_channel_list", "neck.backbone_channel_list",
                           tuple(s[1] for s in shapes), f"{neck}k.conv.weight"))
        facts.append(_Fact("image_encoder.neck.d_model", "neck.d_model", shapes[0][0], f"{neck}0.conv.weight"))
    mem = "memory_attention.layers."
    count("memory_attention.num_layers", "memory_attention.num_layers", mem)
    add("memory_attention.d_model", "memory_attention.d_model", f"{mem}0.self_attn.q_proj.weight", lambda s: s[0])
    add("memory_attention.layer.cross_attention.kv_in_dim", "memory_attention.kv_in_dim",
        f"{mem}0.cross_attn_image.k_proj.weight", lambda s: s[1])
    add("memory_attention.layer.dim_feedforward", "memory_attention.dim_feedforward", f"{mem}0.linear1.weight",
        lambda s: s[0])
    enc = "memory_encoder."
    count("memory_encoder.fuser.num_layers", "memory_encoder.fuser_num_layers", enc + "fuser.layers.")
    add("memory_encoder.out_dim", "memory_encoder.out_dim", enc + "out_proj.weight", lambda s: s[0])
    add("memory_encoder.in_dim", "memory_encoder.in_dim", enc + "pix_feat_proj.weight", lambda s: s[0])
    add("memory_encoder.fuser.layer.kernel_size", "memory_encoder.kernel_size", enc + "fuser.layers.0.dwconv.weight",
        lambda s: s[-1])
    down = enc + "mask_downsampler.encoder."
    convs = [i for i in _indices(sd, down) if len(_shape(sd, f"{down}{i}.weight") or ()) == 4]
    if len(convs) >= 2:  # strided 3x3 convolutions, then the 1x1 projection
        facts.append(_Fact("memory_encoder.mask_downsampler.total_stride", "memory_encoder.mask_downsample_stride",
                           2 ** (len(convs) - 1), f"{len(convs) - 1} strided {down}* convolutions"))
    add("num_maskmem", "num_maskmem", "maskmem_tpos_enc", lambda s: s[0])
    add("memory_encoder.out_dim (maskmem_tpos_enc)", "mem_dim", "maskmem_tpos_enc", lambda s: s[-1])
    flag("use_high_res_features_in_sam", "sam_mask_decoder.conv_s0.weight")
    flag("pred_obj_scores", "sam_mask_decoder.obj_score_token.weight")
    if "sam_mask_decoder.obj_score_token.weight" in sd:
        flag("pred_obj_scores_mlp", "sam_mask_decoder.pred_obj_score_head.layers.0.weight")
    flag("use_obj_ptrs_in_encoder", "mask_downsample.weight")
    flag("use_mlp_for_obj_ptr_proj", "obj_ptr_proj.layers.0.weight")
    flag("no_obj_embed_spatial", "no_obj_embed_spatial")
    flag("add_tpos_enc_to_obj_ptrs and proj_tpos_enc_in_obj_ptrs (SAM 2.1)", "obj_ptr_tpos_proj.weight",
         path="tpos_proj")
    return facts


def _decoder_facts(sd: Mapping[str, torch.Tensor]) -> List[_Fact]:
    """Prompt encoder / mask decoder sizes: fixed in the reference's code, so always taken from the keys."""
    facts: List[_Fact] = []
    dec = "sam_mask_decoder."

    def add(path: str, key: str, pick: Callable[[Tuple[int, ...]], Any]) -> None:
        shape = _shape(sd, key)
        if shape is not None:
            facts.append(_Fact(path, path, pick(shape), key))

    add("transformer_dim", dec + "iou_token.weight", lambda s: s[1])
    add("mask_in_chans", "sam_prompt_encoder.mask_downscaling.3.weight", lambda s: s[0])
    add("decoder_mlp_dim", dec + "transformer.layers.0.mlp.layers.0.weight", lambda s: s[0])
    add("num_multimask_outputs", dec + "mask_tokens.weight", lambda s: s[0] - 1)
    add("iou_head_hidden_dim", dec + "iou_prediction_head.layers.0.weight", lambda s: s[0])
    for path, prefix in (("decoder_depth", dec + "transformer.layers."),
                         ("iou_head_depth", dec + "iou_prediction_head.layers.")):
        n = _count(sd, prefix)
        if n:
            facts.append(_Fact(path, path, n, prefix + "*"))
    return facts


def _get(config: Sam2Config, path: str) -> Any:
    if path == "tpos_proj":
        return config.add_tpos_enc_to_obj_ptrs and config.proj_tpos_enc_in_obj_ptrs
    value: Any = config
    for part in path.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def _set(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return replace(config, **{head: value})
    return replace(config, **{head: _set(getattr(config, head), rest, value)})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _match_public(trunk_facts: List[_Fact]) -> Tuple[Optional[HieraConfig], str]:
    """The public Hiera row whose observable settings all agree; else None and a hint for the message."""
    hint = ""
    for size, row in HIERA.items():
        mismatched = [f for f in trunk_facts if not _same(_get(Sam2Config(trunk=row), f.path), f.value)]
        if not mismatched:
            return row, ""
        if row.embed_dim == trunk_facts[0].value and row.stages == trunk_facts[1].value:
            hint = (f" (embed_dim and stages are those of the public '{size}' trunk, but "
                    + "; ".join(f"{f.name} is {_show(f.value)} instead of "
                                f"{_show(_get(Sam2Config(trunk=row), f.path))}" for f in mismatched) + ")")
    return None, hint


def find_beside_config(checkpoint_path: Union[str, os.PathLike]) -> Optional[Path]:
    """The config file with the checkpoint's stem in its folder (``x.pt`` -> ``x.yaml``), if there is one."""
    path = Path(checkpoint_path)
    for suffix in (".yaml", ".yml"):
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _given(config: ConfigArg, checkpoint_path) -> Tuple[Optional[Sam2Config], str]:
    if isinstance(config, Sam2Config):
        return config, "the given Sam2Config"
    if config is None and checkpoint_path is not None:
        config = find_beside_config(checkpoint_path)
    if config is None:
        return None, ""
    # A model loaded from a file behaves as the reference builders make it (dynamic multimask fallback).
    return load_sam2_config(config, IMAGE_POSTPROCESSING), f"config {os.fspath(config)}"


def infer_sam2_config(sd: Mapping[str, torch.Tensor], *, yaml_config: ConfigArg = None,
                      checkpoint_path: Union[str, os.PathLike, None] = None,
                      source: Optional[str] = None, config_source: Optional[str] = None) -> Sam2Config:
    """Reconstruct the :class:`Sam2Config` of a SAM 2 / 2.1 state dict.

    Args:
        sd: the state dict (public key names).
        yaml_config: a config file in the reference's YAML format, a public config name
            (``sam2.1_hiera_t``, ``configs/sam2/sam2_hiera_b+.yaml``) or a :class:`Sam2Config`. Its values
            are used, after checking them against the keys. Default: a config beside ``checkpoint_path``
            with the same stem, else the public configuration whose trunk layout the keys show.
        checkpoint_path: the file ``sd`` came from (to find a config beside it; named in messages).
        source: how to name the state dict in messages (default: ``checkpoint_path`` or "state dict").
        config_source: how to name a given ``Sam2Config`` in messages (e.g. the file it was read from).

    Raises:
        CheckpointError: not a SAM 2 state dict; a layout that is not public with no config to complete it
            (the message names the missing settings and where to put them); a config that disagrees with
            the keys (every disagreement is listed).
    """
    source = source or (os.fspath(checkpoint_path) if checkpoint_path is not None else "state dict")
    if not is_sam2_state_dict(sd):
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"{source} is not a SAM 2 checkpoint: no '{TRUNK}*' or 'sam_mask_decoder.*' keys "
                              f"(found {len(sd)} keys such as {sample})")
    trunk_facts = _trunk_facts(sd, source)
    facts = _model_facts(sd)
    given, given_name = _given(yaml_config, checkpoint_path)
    given_name = config_source or given_name
    if given is None:
        trunk, hint = _match_public(trunk_facts)
        if trunk is None:
            stem = Path(checkpoint_path).with_suffix(".yaml").name if checkpoint_path is not None else "<stem>.yaml"
            seen = "; ".join(f"{f.name.split('.')[-1]} {_show(f.value)}" for f in trunk_facts)
            raise CheckpointError(
                f"{source}: its Hiera trunk ({seen}) is not one of the four public SAM 2 layouts (t, s, b+, l)"
                f"{hint}, and the keys do not say the trunk's num_heads, global_att_blocks and window_spec "
                f"(windows of stages 2..4). Give them in a config file in the reference's YAML format (the "
                f"model: tree of configs/sam2.1/sam2.1_hiera_t.yaml with this model's numbers): save it beside "
                f"the checkpoint as {stem}, or pass it explicitly, e.g. load_model(path, config='model.yaml') "
                f"or build_sam2('model.yaml', path).")
        config = Sam2Config(trunk=trunk, neck=NeckConfig(backbone_channel_list=trunk.channel_list))
        if "obj_ptr_tpos_proj.weight" not in sd:
            config = replace(config, **SAM20_FLAGS)
        for fact in facts:
            if fact.path != "tpos_proj":
                config = _set(config, fact.path, fact.value)
    else:
        config = given
        wrong = [f"  {f.name}: config {_show(_get(config, f.path))}, checkpoint {_show(f.value)} (from {f.evidence})"
                 for f in trunk_facts + facts if not _same(_get(config, f.path), f.value)]
        if wrong:
            raise CheckpointError(f"{given_name} does not describe {source}; they disagree on "
                                  f"{len(wrong)} setting(s):\n" + "\n".join(wrong)
                                  + "\nUse the config this checkpoint was made with.")
    for fact in _decoder_facts(sd):
        config = _set(config, fact.path, fact.value)
    return config


def sam2_model_from_state_dict(sd: Mapping[str, torch.Tensor], *, config: ConfigArg = None, video: bool = False,
                               checkpoint_path: Union[str, os.PathLike, None] = None,
                               source: Optional[str] = None, config_source: Optional[str] = None):
    """Build the :class:`~anyseg.modeling.sam2.Sam2` for ``sd`` and load it strictly (eval mode).

    ``config`` (and ``config_source``) as ``yaml_config`` of :func:`infer_sam2_config`; ``video=True`` applies the video builder's
    settings (:meth:`Sam2Config.for_video`).
    """
    from .modeling.sam2 import build_sam2_model

    source = source or (os.fspath(checkpoint_path) if checkpoint_path is not None else "state dict")
    sd = unwrap_state_dict(sd, source)
    resolved = infer_sam2_config(sd, yaml_config=config, checkpoint_path=checkpoint_path, source=source,
                                 config_source=config_source)
    if video:
        resolved = resolved.for_video()
    model = build_sam2_model(resolved)
    check_keys(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_sam2_model(path: Union[str, os.PathLike], *, config: ConfigArg = None,
                    device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                    video: bool = False):
    """Load a SAM 2 / 2.1 checkpoint (``.pt``, ``.pth``, ``.safetensors`` or a registry name such as
    ``sam2.1_hiera_t``), ready for inference (eval mode).

    Args:
        path: the checkpoint file or registry name.
        config: a config file / public config name / :class:`Sam2Config` (see :func:`infer_sam2_config`);
            default: a ``.yaml`` beside the file with the same stem, else inferred from the keys.
        device, dtype: where and in which dtype to put the parameters (default: CPU, float32).
        video: apply the video builder's settings (binarised prompted masks for memory, hole filling).
    """
    from .hub import resolve_checkpoint

    resolved = resolve_checkpoint(path)
    sd = read_state_dict(resolved)
    model = sam2_model_from_state_dict(sd, config=config, video=video, checkpoint_path=resolved)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
