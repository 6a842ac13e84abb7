"""Read SAM state dicts, infer the architecture from their keys and shapes, and load models.

Keys are the public ones, so loading is the identity map. Anything that does not fit raises one
:class:`CheckpointError` saying what the file is and listing missing / unexpected / mis-shaped keys.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch

from .config import (HQConfig, MaskDecoderConfig, PromptEncoderConfig, SamConfig, TinyViTConfig, ViTConfig)
from .modeling.sam import Sam, build_sam

StateDict = Dict[str, torch.Tensor]
ENC = "image_encoder."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit a SAM architecture."""


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Read a plain state dict from ``.pth``/``.pt`` (weights only, no code runs) or ``.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"could not read safetensors file {path}: {exc}") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"refused to load {path}: it is not a plain state dict of tensors (loading it would run "
                f"code from the file, which anyseg does not do). Re-save it as a state dict or as "
                f".safetensors. Details: {str(exc).splitlines()[0]}"
            ) from exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"could not read {path} as a PyTorch checkpoint (truncated or not a "
                                  f"checkpoint?): {str(exc).splitlines()[0]}") from exc
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj, source: str = "checkpoint") -> StateDict:
    """Accept a state dict, or one nested under 'model' / 'state_dict'; check it holds tensors."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: expected only tensors in the state dict, found other values "
                              f"under {bad[:5]}")
    return dict(obj)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [regex.match(k)] if m}
    return max(found) + 1 if found else 0


def _infer_vit(sd: Mapping[str, torch.Tensor]) -> ViTConfig:
    proj = sd[ENC + "patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    pos = sd.get(ENC + "pos_embed")
    grid = pos.shape[1] if pos is not None else 1024 // patch
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
    if depth == 0:
        raise CheckpointError("ViT encoder without blocks (no image_encoder.blocks.* keys)")
    mlp_hidden = sd[ENC + "blocks.0.mlp.lin1.weight"].shape[0]
    use_rel_pos = ENC + "blocks.0.attn.rel_pos_h" in sd
    global_idx: List[int] = []
    window = 14
    heads = max(1, dim // 64)
    if use_rel_pos:
        head_dim = sd[ENC + "blocks.0.attn.rel_pos_h"].shape[1]
        heads = dim // head_dim
        windows = set()
        for i in range(depth):
            length = sd[ENC + f"blocks.{i}.attn.rel_pos_h"].shape[0]
            if length == 2 * grid - 1:
                global_idx.append(i)
            else:
                windows.add((length + 1) // 2)
        if len(windows) > 1:
            raise CheckpointError(f"windowed blocks disagree on the window size: {sorted(windows)}")
        if windows:
            window = windows.pop()
    return ViTConfig(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=tuple(global_idx),
                     window_size=window, patch_size=patch, img_size=grid * patch, mlp_ratio=mlp_hidden / dim,
                     out_chans=sd[ENC + "neck.0.weight"].shape[0], use_rel_pos=use_rel_pos,
                     qkv_bias=ENC + "blocks.0.attn.qkv.bias" in sd, in_chans=in_chans)


def _infer_tiny_vit(sd: Mapping[str, torch.Tensor], img_size: int) -> TinyViTConfig:
    n_layers = _count(sd, r"image_encoder\.layers\.(\d+)\.")
    if n_layers < 2:
        raise CheckpointError("TinyViT encoder needs at least 2 stages (image_encoder.layers.*)")
    conv1 = sd[ENC + "layers.0.blocks.0.conv1.c.weight"]
    dims = [conv1.shape[1]]
    expand = conv1.shape[0] / conv1.shape[1]
    depths = [_count(sd, r"image_encoder\.layers\.0\.blocks\.(\d+)\.")]
    # Stage 0 is convolutional: its head count and window are unused and not stored in the weights,
    # so they take MobileSAM's values (which makes a vit_t state dict infer exactly to vit_t).
    default = TinyViTConfig()
    heads, windows = [default.num_heads[0]], [default.window_sizes[0]]
    mlp_ratio = 4.0
    for i in range(1, n_layers):
        dims.append(sd[ENC + f"layers.{i}.blocks.0.attn.qkv.weight"].shape[1])
        depths.append(_count(sd, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\."))
        biases = sd[ENC + f"layers.{i}.blocks.0.attn.attention_biases"]
        heads.append(biases.shape[0])
        # A w x w window has w*w distinct (|dr|, |dc|) offsets.
        side = int(round(biases.shape[1] ** 0.5))
        if side * side != biases.shape[1]:
            raise CheckpointError(f"stage {i}: {biases.shape[1]} attention offsets is not a square window")
        windows.append(side)
        mlp_ratio = sd[ENC + f"layers.{i}.blocks.0.mlp.fc1.weight"].shape[0] / dims[-1]
    local = sd[ENC + "layers.1.blocks.0.local_conv.c.weight"].shape[-1]
    head = sd.get(ENC + "head.weight")
    return TinyViTConfig(embed_dims=tuple(dims), depths=tuple(depths), num_heads=tuple(heads),
                         window_sizes=tuple(windows), mlp_ratio=mlp_ratio, mbconv_expand_ratio=expand,
                         local_conv_size=local, img_size=img_size, out_chans=sd[ENC + "neck.0.weight"].shape[0],
                         in_chans=sd[ENC + "patch_embed.seq.0.c.weight"].shape[1],
                         num_classes=head.shape[0] if head is not None else 0)


def infer_config(sd: Mapping[str, torch.Tensor], *, img_size: Optional[int] = None) -> SamConfig:
    """Reconstruct the :class:`SamConfig` of a SAM state dict from its keys and shapes.

    ``img_size`` is needed only for TinyViT checkpoints trained at a resolution other than 1024
    (nothing in a TinyViT's weights depends on it).
    """
    if any(k.startswith(ENC + "trunk.") for k in sd):
        raise CheckpointError("this is a SAM 2 checkpoint (image_encoder.trunk.* keys): load it with "
                              "anyseg.load_model, or infer its config with anyseg.sam2_checkpoint.infer_sam2_config")
    if not any(k.startswith(ENC) for k in sd):
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(
            f"not a SAM checkpoint: no 'image_encoder.*' keys (found {len(sd)} keys such as {sample})"
        )
    try:
        if ENC + "patch_embed.proj.weight" in sd:
            encoder = _infer_vit(sd)
            if img_size is not None and img_size != encoder.img_size:
                raise CheckpointError(f"ViT position embedding is for {encoder.img_size} px inputs, not {img_size}")
        elif ENC + "patch_embed.seq.0.c.weight" in sd:
            encoder = _infer_tiny_vit(sd, img_size or 1024)
        else:
            raise CheckpointError("unknown image encoder: expected ViT keys (image_encoder.patch_embed.proj.*) "
                                  "or TinyViT keys (image_encoder.patch_embed.seq.*)")
        prompt = PromptEncoderConfig(
            embed_dim=sd["prompt_encoder.no_mask_embed.weight"].shape[1],
            mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        )
        dec = "mask_decoder."
        q_out = sd[dec + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
        dim = sd[dec + "iou_token.weight"].shape[1]
        decoder = MaskDecoderConfig(
            transformer_dim=dim,
            depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
            mlp_dim=sd[dec + "transformer.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample_rate=dim // q_out,
            num_multimask_outputs=sd[dec + "mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            iou_head_hidden_dim=sd[dec + "iou_prediction_head.layers.0.weight"].shape[0],
        )
        hq = _infer_hq(sd, encoder)
    except KeyError as exc:
        raise CheckpointError(f"incomplete SAM checkpoint: key {exc.args[0]!r} is missing") from exc
    return SamConfig(encoder=encoder, prompt=prompt, decoder=decoder, hq=hq)


def _infer_hq(sd: Mapping[str, torch.Tensor], encoder) -> Optional[HQConfig]:
    """HQ-SAM iff ``mask_decoder.hf_token.weight`` is present (spec/hq_sam.md §1); its ``vit_dim`` must be
    the channel count of the encoder feature the HQ decoder reads."""
    if "mask_decoder.hf_token.weight" not in sd:
        return None
    vit_dim = sd["mask_decoder.compress_vit_feat.0.weight"].shape[0]
    if isinstance(encoder, ViTConfig):
        expected, where = encoder.embed_dim, "the ViT embed dim"
    else:
        if len(encoder.embed_dims) < 3:
            raise CheckpointError("HQ-SAM needs a TinyViT with at least three stages")
        expected, where = encoder.embed_dims[2], "TinyViT's third stage width"
    if vit_dim != expected:
        raise CheckpointError(f"malformed HQ-SAM checkpoint: mask_decoder.compress_vit_feat.0.weight takes "
                              f"{vit_dim} channels, but {where} is {expected}")
    return HQConfig(vit_dim=vit_dim)


def check_keys(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if not (missing or unexpected or misshaped):
        return

    def block(title: str, items: List[str]) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    raise CheckpointError(
        f"{source} does not match the SAM architecture inferred from it"
        + block("missing keys", missing) + block("unexpected keys", unexpected)
        + block("mis-shaped keys", misshaped)
    )


def model_from_state_dict(sd: Mapping[str, torch.Tensor], *, config: Optional[SamConfig] = None,
                          source: str = "state dict") -> Sam:
    """Build a model for ``sd`` (config inferred unless given) and load it strictly."""
    sd = unwrap_state_dict(sd, source)
    config = config or infer_config(sd)
    model = build_sam(config)
    check_keys(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def load_model(path_or_name: Union[str, os.PathLike], device: Union[str, torch.device, None] = None,
               dtype: Optional[torch.dtype] = None, *, img_size: Optional[int] = None, speed=None,
               config=None, video: bool = False):
    """Load a SAM, SAM 2 / 2.1 or SAM 3 checkpoint, ready for inference (eval mode).

    Args:
        path_or_name: a ``.pth`` / ``.pt`` / ``.safetensors`` file, or a registered name
            (``vit_b``, ``vit_l``, ``vit_h``, ``vit_t``, ``sam2.1_hiera_t``, ...) resolved through the
            cache (see ``anyseg.hub``). SAM 2 checkpoints are recognised by their keys and loaded by
            :func:`anyseg.sam2_checkpoint.sam2_model_from_state_dict` (a ``.yaml`` beside the file with the
            same stem completes a layout that is not one of the public ones). SAM 3 checkpoints
            (``detector.*`` keys) give the image detector (:mod:`anyseg.sam3_checkpoint`); their
            ``tracker.*`` keys are set aside.
        config: SAM 1: a :class:`SamConfig` instead of the inferred one. SAM 2: a config file in the
            reference's YAML format, a public config name or a ``Sam2Config`` (checked against the keys).
        video: SAM 2 only: build with the video builder's settings (``Sam2Config.for_video()``).
        device: where to put the model (default: CPU).
        dtype: parameter dtype (default: float32, the faithful path).
        img_size: input resolution (square frame, px) to run the model at, when not the one it was
            trained at: a TinyViT is built for it; a ViT gets its position tables resampled
            (:func:`anyseg.resolution.resize_state_dict`). Default: the checkpoint's own size.
        speed: fast paths to switch on (see ``anyseg.speed``): ``None`` or ``"faithful"`` (the
            reference float32 computation), ``"lossless"``, ``"auto"`` (sensible for the device) or a
            ``SpeedConfig``.
    """
    from .hub import resolve_checkpoint

    path = resolve_checkpoint(path_or_name)
    sd = read_state_dict(path)
    source = str(path)
    family_model = _load_other_family(sd, path, config=config, video=video, img_size=img_size)
    if family_model is not None:
        if device is not None or dtype is not None:
            family_model.to(device=device, dtype=dtype)
        if speed is not None:
            from .speed import apply, resolve

            if getattr(family_model.config, "kind", None) == "sam3":
                from .protocol import apply_speed

                apply_speed(family_model, speed)  # SAM 3's presets: the trunk's dtype (see protocol)
                return family_model
            apply(family_model, resolve(speed, family_model.device))
        return family_model
    if video:
        raise ValueError(f"video=True needs a SAM 2 checkpoint; {source} is a SAM 1 checkpoint")
    if img_size is not None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        if ENC + "pos_embed" in sd:  # a ViT: its position tables fix the size, so resample them
            from .resolution import resize_state_dict

            sd, source, img_size = resize_state_dict(sd, img_size), f"{path} at {img_size} px", None
    if config is not None and not isinstance(config, SamConfig):
        raise TypeError(f"{source} is a SAM 1 checkpoint: config must be a SamConfig, got {type(config).__name__}")
    config = config or infer_config(sd, img_size=img_size)
    model = model_from_state_dict(sd, config=config, source=source)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if speed is not None:
        from .speed import apply, resolve

        apply(model, resolve(speed, model.device))
    return model


def _load_other_family(sd: StateDict, path: Path, *, config, video: bool, img_size: Optional[int]):
    """The model of a state dict of another family than SAM 1 (SAM 2 / 2.1, SAM 3), or None for SAM 1."""
    from .sam2_checkpoint import is_sam2_state_dict, sam2_model_from_state_dict
    from .sam3_checkpoint import is_sam3_state_dict, sam3_model_from_state_dict

    if is_sam3_state_dict(sd):
        if video or img_size is not None:
            raise NotImplementedError(f"{path} is a SAM 3 checkpoint: its image detector loads at its own "
                                      "size (img_size) and its video tracker is not supported yet (video=True)")
        model = sam3_model_from_state_dict(sd, config=config, source=str(path))
        model.checkpoint_dir = str(Path(path).parent)  # where the tokenizer also looks for its vocabulary
        return model
    if not is_sam2_state_dict(sd):
        return None
    if img_size is not None:
        raise NotImplementedError(f"{path} is a SAM 2 checkpoint: img_size is not supported for SAM 2 (the "
                                  "models run at their configured image_size)")
    return sam2_model_from_state_dict(sd, config=config, video=video, checkpoint_path=path)


def save_model(model: Sam, path: Union[str, os.PathLike]) -> Path:
    """Save in the public layout (plain state dict; ``.safetensors`` by suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def with_image_size(config: SamConfig, img_size: int) -> SamConfig:
    """The same architecture at another input resolution."""
    return replace(config, encoder=replace(config.encoder, img_size=img_size))
