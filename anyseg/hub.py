"""Checkpoint names, the local cache and verified downloads.

A checkpoint is named either by a path to a file or by a registry name such as ``"vit_b"``.
:func:`resolve_checkpoint` turns either into a local file, downloading registry checkpoints into
the cache directory on first use::

    from anyseg.hub import resolve_checkpoint
    path = resolve_checkpoint("vit_b")          # ~/.cache/anyseg/checkpoints/sam_vit_b_01ec64.pth

Environment variables:

``ANYSEG_HOME``
    Cache root (default ``~/.cache/anyseg``); checkpoints live in ``$ANYSEG_HOME/checkpoints``.
``ANYSEG_OFFLINE``
    When set to ``1`` / ``true`` / ``yes`` / ``on``, nothing is downloaded: a checkpoint that is not
    in the cache raises :class:`FileNotFoundError` saying where to put it.

Downloads are streamed to a temporary file next to the destination, hashed while streaming, and
moved into place with :func:`os.replace` only once the digest matches, so an interrupted or
corrupt download never leaves a file under the final name. After a verified download (or the first
verification of a file placed in the cache by hand) a small ``<file>.sha256`` sidecar records the
digest with the file's size and modification time, so later loads do not hash multi-gigabyte files
again.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

__all__ = [
    "CheckpointInfo",
    "REGISTRY",
    "cache_dir",
    "checkpoints_dir",
    "download",
    "get_checkpoint_info",
    "hf_checkpoint_info",
    "resolve_hf_id",
    "register_checkpoint",
    "BUNDLED",
    "bundled_path",
    "resolve_checkpoint",
    "unregister_checkpoint",
]

_CHUNK = 1 << 20  # 1 MiB
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
_SIDECAR_SUFFIX = ".sha256"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class CheckpointInfo:
    """One downloadable checkpoint.

    Attributes:
        name: Registry name, e.g. ``"vit_b"``; also the model variant it holds.
        filename: File name in the cache directory (the official file name).
        url: Where the file is downloaded from.
        sha256: Full lowercase hex sha256 of the file, or ``None`` when unknown.
        size_bytes: Exact file size in bytes, or ``None`` when unknown.
        description: One line for humans.
        sha256_prefix: Leading hex digits of the sha256, used only when ``sha256`` is ``None``.
        hf_id: The Hugging Face hub repository holding the same file (``facebook/sam2.1-hiera-tiny``).
        config_name: The reference's config for the file (SAM 2: ``configs/sam2.1/sam2.1_hiera_t.yaml``).
        hf_only: The file is only published on the (gated) Hugging Face repository ``hf_id``: it is fetched
            with ``huggingface_hub`` (which uses the user's access token), never by a plain download.
        manual: The file is published on a page without a fixed download address (``url`` is that page):
            it is put into the cache by hand, and a missing file is reported with where to save it.
    """

    name: str
    filename: str
    url: str
    sha256: str | None = None
    size_bytes: int | None = None
    description: str = ""
    sha256_prefix: str | None = None
    hf_id: str | None = None
    config_name: str | None = None
    hf_only: bool = False
    manual: bool = False

    def __post_init__(self) -> None:
        for field_name in ("sha256", "sha256_prefix"):
            value = getattr(self, field_name)
            if value is None:
                continue
            value = value.strip().lower()
            if not value or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"{field_name} of checkpoint {self.name!r} must be hex, got {value!r}")
            if field_name == "sha256" and len(value) != 64:
                raise ValueError(
                    f"sha256 of checkpoint {self.name!r} must have 64 hex digits, got {len(value)}"
                )
            object.__setattr__(self, field_name, value)
        if not self.filename or "/" in self.filename or "\\" in self.filename:
            raise ValueError(f"filename of checkpoint {self.name!r} must be a bare file name")


# Digests and sizes are the published values for the official files, as listed (identically) by
# several public projects that verify these downloads, e.g. micro-sam
# (computational-cell-analytics/micro-sam, micro_sam/util.py, `_CHECKSUMS`) for all four digests,
# and Fooocus-derived model manifests / installers for the byte sizes.
# Note: the six hex digits in the SAM file names are NOT the leading digits of the files' sha256
# (e.g. sam_vit_b_01ec64.pth has sha256 ec2df627...), so they are not used for verification.
_BUILTIN = (
    CheckpointInfo(
        name="vit_h",
        filename="sam_vit_h_4b8939.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size_bytes=2564550879,
        description="SAM ViT-H (636M parameters), the default and most accurate model",
    ),
    CheckpointInfo(
        name="vit_l",
        filename="sam_vit_l_0b3195.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size_bytes=1249524607,
        description="SAM ViT-L (308M parameters)",
    ),
    CheckpointInfo(
        name="vit_b",
        filename="sam_vit_b_01ec64.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375042383,
        description="SAM ViT-B (91M parameters), the smallest original SAM",
    ),
    CheckpointInfo(
        name="vit_t",
        filename="mobile_sam.pt",
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        size_bytes=40728226,
        description="MobileSAM: TinyViT encoder (5.8M parameters) with the SAM prompt encoder and decoder",
    ),
)


def _sam2(version: str, size: str, long: str, hf_size: str) -> CheckpointInfo:
    prefix, folder, date = ("sam2", "sam2", "072824") if version == "2.0" else ("sam2.1", "sam2.1", "092824")
    filename = f"{prefix}_hiera_{long}.pt"
    return CheckpointInfo(
        name=f"{prefix}_hiera_{size}",
        filename=filename,
        url=f"https://dl.fbaipublicfiles.com/segment_anything_2/{date}/{filename}",
        description=f"SAM {version} Hiera-{size.upper()} (images and video)",
        hf_id=f"facebook/{prefix}-hiera-{hf_size}",
        config_name=f"configs/{folder}/{prefix}_hiera_{size}.yaml",
    )


# SAM 2 / 2.1 (spec/sam2.md 11.5): no checksums are published for these files, so only their names are
# checked; the long names (sam2.1_hiera_tiny, the file stems) are aliases.
_SAM2_SIZES = (("t", "tiny", "tiny"), ("s", "small", "small"), ("b+", "base_plus", "base-plus"),
               ("l", "large", "large"))
_BUILTIN += tuple(_sam2(version, size, long, hf) for version in ("2.0", "2.1") for size, long, hf in _SAM2_SIZES)

# HQ-SAM (spec/hq_sam.md 1), from the authors' Hugging Face repository; no checksums are published.
_HQ = (("b", "vit_b", "ViT-B"), ("l", "vit_l", "ViT-L"), ("h", "vit_h", "ViT-H"), ("tiny", "vit_tiny", "TinyViT (Light HQ-SAM)"))
_BUILTIN += tuple(
    CheckpointInfo(name=f"hq_vit_{size}", filename=f"sam_hq_{stem}.pth",
                   url=f"https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_{stem}.pth",
                   description=f"HQ-SAM {encoder}: SAM with the high-quality output token")
    for size, stem, encoder in _HQ
)

# SAM 3 (spec/sam3.md section 0): one file, on a gated Hugging Face repository (access is granted per
# account), so it is fetched through huggingface_hub with the user's token; no checksum is published.
_BUILTIN += (CheckpointInfo(name="sam3", filename="sam3.pt", url="https://huggingface.co/facebook/sam3/resolve/main/sam3.pt",
                            description="SAM 3 (concept prompts: a phrase or exemplar boxes -> every instance)",
                            hf_id="facebook/sam3", hf_only=True),)

# MedSAM (a SAM ViT-B fine-tuned on medical images): its authors share the file through a file-hosting
# page linked from the project, not at a fixed address, so it is placed in the cache by hand. It loads as
# a SAM ViT-B; anyseg.beyond.medical.load_medsam marks it for MedSAM's preprocessing.
_BUILTIN += (CheckpointInfo(name="medsam_vit_b", filename="medsam_vit_b.pth", url="https://github.com/bowang-lab/MedSAM",
                            description="MedSAM: SAM ViT-B fine-tuned for box-prompted medical image segmentation "
                                        "(use with preprocess='medsam', see docs/beyond.md)", manual=True),)

_REGISTRY: dict[str, CheckpointInfo] = {info.name: info for info in _BUILTIN}
_ALIASES: dict[str, str] = {
    "default": "vit_h",
    "sam_vit_h": "vit_h",
    "sam_vit_l": "vit_l",
    "sam_vit_b": "vit_b",
    "mobilesam": "vit_t",
    "mobile_sam": "vit_t",
    "sam_vit_t": "vit_t",
    **{f"{prefix}_hiera_{long}": f"{prefix}_hiera_{size}"
       for prefix in ("sam2", "sam2.1") for size, long, _ in _SAM2_SIZES},
    **{f"sam_hq_{stem}": f"hq_vit_{size}" for size, stem, _ in _HQ},
}

REGISTRY: Mapping[str, CheckpointInfo] = MappingProxyType(_REGISTRY)
"""Read-only view of the known checkpoints, keyed by name; add entries with :func:`register_checkpoint`."""

# Models shipped inside the package (``anyseg/weights/``): resolved without the cache or any download.
_BUNDLED: dict[str, str] = {"nano": "nano.safetensors"}
BUNDLED: Mapping[str, str] = MappingProxyType(_BUNDLED)
"""Read-only view of the built-in models: name -> file name in ``anyseg/weights/``."""


def bundled_path(name: str) -> Path | None:
    """The file of a built-in model (``"nano"``), or ``None`` when ``name`` is not one.

    Raises:
        FileNotFoundError: the name is built in but its file is missing from the installation.
    """
    filename = _BUNDLED.get(_normalize(name))
    if filename is None:
        return None
    path = Path(__file__).resolve().parent / "weights" / filename
    if not path.is_file():
        raise FileNotFoundError(f"built-in model {name!r} is missing from this installation (expected {path}); "
                                "reinstall anyseg with its package data")
    return path


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_checkpoint(
    info: CheckpointInfo, *, aliases: Iterable[str] = (), overwrite: bool = False
) -> None:
    """Add a checkpoint to :data:`REGISTRY` so that :func:`resolve_checkpoint` knows its name.

    Args:
        info: The checkpoint description. ``info.name`` becomes the registry key.
        aliases: Other names that resolve to ``info.name``.
        overwrite: Replace an existing entry (or alias) of the same name instead of raising.

    Raises:
        ValueError: the name or an alias is already taken and ``overwrite`` is false.
    """
    key = _normalize(info.name)
    alias_keys = [_normalize(a) for a in aliases]
    if not overwrite:
        taken = [n for n in [key, *alias_keys] if n in _REGISTRY or n in _ALIASES]
        if taken:
            raise ValueError(
                f"checkpoint name(s) {', '.join(map(repr, taken))} already registered; "
                "pass overwrite=True to replace"
            )
    _ALIASES.pop(key, None)
    _REGISTRY[key] = info
    for alias in alias_keys:
        if alias != key:
            _REGISTRY.pop(alias, None)
            _ALIASES[alias] = key


def unregister_checkpoint(name: str) -> CheckpointInfo:
    """Remove a checkpoint (and the aliases pointing to it) from the registry and return it.

    Raises:
        KeyError: no checkpoint of that name is registered.
    """
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    info = _REGISTRY.pop(key)
    for alias in [a for a, target in _ALIASES.items() if target == key]:
        del _ALIASES[alias]
    return info


def get_checkpoint_info(name: str) -> CheckpointInfo:
    """Look up a registry name or alias (case-insensitive, ``-`` and ``_`` equivalent).

    Raises:
        ValueError: the name is unknown; the message lists the known names and aliases.
    """
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    try:
        return _REGISTRY[key]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        aliases = ", ".join(f"{a} -> {t}" for a, t in sorted(_ALIASES.items()))
        raise ValueError(
            f"unknown checkpoint {name!r}: not an existing file and not a known name. "
            f"Known names: {known}" + (f" (aliases: {aliases})" if aliases else "")
            + ". Pass a path to a checkpoint file to use your own weights."
        ) from None


def hf_checkpoint_info(hub_id: str) -> CheckpointInfo:
    """The registry entry of a Hugging Face hub id such as ``facebook/sam2.1-hiera-tiny`` (case-insensitive).

    Raises:
        ValueError: not a known hub id; the message lists them.
    """
    wanted = hub_id.strip().lower()
    for info in _REGISTRY.values():
        if info.hf_id is not None and info.hf_id.lower() == wanted:
            return info
    known = ", ".join(sorted(i.hf_id for i in _REGISTRY.values() if i.hf_id))
    raise ValueError(f"unknown Hugging Face model id {hub_id!r}; known ids: {known}")


def resolve_hf_id(hub_id: str, *, download: bool = True) -> Path:
    """A local file for a Hugging Face hub id (``facebook/sam2.1-hiera-tiny``).

    The file already in anyseg's cache under its official name is used as is; otherwise it is fetched with
    ``huggingface_hub.hf_hub_download`` (into the Hugging Face cache), which needs the ``huggingface_hub``
    package. With ``ANYSEG_OFFLINE=1`` or ``download=False`` only files already in one of the caches are used.

    Raises:
        ValueError: an unknown hub id.
        ImportError: huggingface_hub is not installed and the file is not in anyseg's cache.
        FileNotFoundError: the file could not be fetched (offline, no network, ...).
    """
    info = hf_checkpoint_info(hub_id)
    dest = checkpoints_dir() / info.filename
    if dest.is_file():
        _verify_cached(dest, info)
        return dest
    if info.hf_only:
        by_hand = (f"download {info.filename} from https://huggingface.co/{info.hf_id} (a gated repository: "
                   f"request access there first) and save it as {dest}")
    else:
        by_hand = (f"download {info.filename} from https://huggingface.co/{info.hf_id} (or {info.url}) and "
                   f"save it as {dest}, or load it by its anyseg name {info.name!r}, which downloads it "
                   "without huggingface_hub")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ImportError(f"loading {hub_id!r} from the Hugging Face hub needs the huggingface_hub package "
                          f"(pip install huggingface_hub); or {by_hand}") from exc
    local_only = not download or _offline()
    try:
        return Path(hf_hub_download(repo_id=info.hf_id, filename=info.filename, local_files_only=local_only))
    except Exception as exc:  # huggingface_hub raises many types (offline, HTTP, missing cache entry)
        reason = "offline mode: not in the Hugging Face cache" if local_only else f"{type(exc).__name__}: {exc}"
        raise FileNotFoundError(f"could not get {info.filename} of {hub_id!r} from the Hugging Face hub "
                                f"({reason}); {by_hand}") from exc


def cache_dir() -> Path:
    """The cache root: ``$ANYSEG_HOME`` if set, else ``~/.cache/anyseg``; created if missing."""
    env = os.environ.get("ANYSEG_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "anyseg"
    root.mkdir(parents=True, exist_ok=True)
    return root


def checkpoints_dir() -> Path:
    """Where registry checkpoints are stored: ``cache_dir() / "checkpoints"``; created if missing."""
    path = cache_dir() / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _offline() -> bool:
    return os.environ.get("ANYSEG_OFFLINE", "").strip().lower() in _TRUE


def _looks_like_path(text: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in text for s in seps) or text.lower().endswith(_CHECKPOINT_SUFFIXES) or text.startswith("~")


def resolve_checkpoint(
    name_or_path: str | os.PathLike, *, download: bool = True, progress: bool = True
) -> Path:
    """Turn a checkpoint path or registry name into a local file.

    * An existing file is returned unchanged (as a :class:`~pathlib.Path`).
    * Anything that looks like a path (a path object, a string with a path separator or ending
      in ``.pth`` / ``.pt`` / ``.safetensors``) but does not exist raises :class:`FileNotFoundError`.
    * A built-in name (see :data:`BUNDLED`: ``"nano"``) gives the file shipped in ``anyseg/weights/``
      (never downloaded).
    * A registry name (see :data:`REGISTRY`, aliases such as ``"default"`` and ``"mobilesam"``)
      gives the cached file, downloading it first if needed and allowed.

    A cached file is checked against the known size every time; its digest is checked once and then
    remembered in a ``<file>.sha256`` sidecar that is trusted while the file's size and modification
    time are unchanged.

    Args:
        name_or_path: A path to a checkpoint file or a registry name.
        download: Allow downloading a missing registry checkpoint. ``ANYSEG_OFFLINE=1`` also forbids it.
        progress: Show a progress bar while downloading.

    Raises:
        FileNotFoundError: a path that does not exist, or a registry checkpoint that is not cached
            while downloading is not allowed (the message says where to put the file).
        ValueError: an unknown name, or a cached file whose size or digest is wrong.
        ConnectionError: the download failed.
    """
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path)
        if path.is_file():
            return path
        if path.expanduser().is_file():
            return path.expanduser()
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(name_or_path)}")
    if not isinstance(name_or_path, str):
        raise TypeError(f"expected a checkpoint name or path, got {type(name_or_path).__name__}")

    text = name_or_path
    path = Path(text)
    if text and path.is_file():
        return path
    hf_info = next((i for i in _REGISTRY.values() if i.hf_id and i.hf_id.lower() == text.strip().lower()), None)
    if hf_info is not None and hf_info.hf_only:
        return resolve_hf_id(text, download=download)
    if _looks_like_path(text):
        expanded = path.expanduser()
        if expanded.is_file():
            return expanded
        if expanded.is_dir():
            raise FileNotFoundError(f"checkpoint path is a directory, not a file: {text}")
        raise FileNotFoundError(f"checkpoint file not found: {text}")

    bundled = bundled_path(text)
    if bundled is not None:
        return bundled
    info = get_checkpoint_info(text)
    dest = checkpoints_dir() / info.filename
    if dest.is_file():
        _verify_cached(dest, info)
        return dest
    if info.hf_only:
        return resolve_hf_id(info.hf_id, download=download)
    if info.manual:
        raise FileNotFoundError(
            f"checkpoint {info.name!r} is not in the cache and has no fixed download address: get "
            f"{info.filename} from {info.url} (its README links the file) and save it as {dest} "
            f"(set ANYSEG_HOME to use another cache directory than {dest.parent.parent}), "
            "or pass the path of the file instead of a name."
        )

    if not download or _offline():
        reason = "ANYSEG_OFFLINE is set" if _offline() else "download=False was given"
        raise FileNotFoundError(
            f"checkpoint {info.name!r} is not in the cache and downloading is disabled ({reason}). "
            f"Download {info.filename} from {info.url} and save it as {dest} "
            f"(set ANYSEG_HOME to use another cache directory than {dest.parent.parent}), "
            "or pass the path of a local checkpoint file instead of a name."
        )
    return _download(
        info.url,
        dest,
        sha256=info.sha256,
        sha256_prefix=None if info.sha256 else info.sha256_prefix,
        size_bytes=info.size_bytes,
        progress=progress,
    )


def _digest_ok(actual: str, sha256: str | None, sha256_prefix: str | None) -> bool:
    if sha256 is not None:
        return actual == sha256.lower()
    if sha256_prefix is not None:
        return actual.startswith(sha256_prefix.lower())
    return True


def _expected_text(sha256: str | None, sha256_prefix: str | None) -> str:
    return sha256 if sha256 is not None else f"{sha256_prefix}... (prefix)"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _read_sidecar(path: Path) -> str | None:
    """The digest recorded for ``path`` if the sidecar matches its current size and mtime."""
    try:
        data = json.loads(_sidecar(path).read_text())
        st = path.stat()
        if int(data["size"]) == st.st_size and int(data["mtime_ns"]) == st.st_mtime_ns:
            return str(data["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_sidecar(path: Path, digest: str) -> None:
    """Record a verified digest; a read-only cache only means the file is hashed again next time."""
    side = _sidecar(path)
    tmp = side.with_name(side.name + f".part-{secrets.token_hex(4)}")
    try:
        st = path.stat()
        tmp.write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(tmp, side)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_cached(path: Path, info: CheckpointInfo) -> None:
    size = path.stat().st_size
    if info.size_bytes is not None and size != info.size_bytes:
        raise ValueError(
            f"cached checkpoint {path} has {size} bytes, expected {info.size_bytes} for {info.name!r} "
            f"({info.url}); the file is incomplete or not the official one. Delete it to download "
            "again, or pass its path directly to use it as is."
        )
    if info.sha256 is None and info.sha256_prefix is None:
        return
    recorded = _read_sidecar(path)
    if recorded is not None and _digest_ok(recorded, info.sha256, info.sha256_prefix):
        return
    actual = _sha256_file(path)
    if not _digest_ok(actual, info.sha256, info.sha256_prefix):
        raise ValueError(
            f"cached checkpoint {path} has sha256 {actual}, expected "
            f"{_expected_text(info.sha256, info.sha256_prefix)} for {info.name!r} ({info.url}). "
            "Delete it to download again, or pass its path directly to use it as is."
        )
    _write_sidecar(path, actual)


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _progress_bar(total: int | None, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is cosmetic; never fail a download over it
        return None
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        # None lets tqdm disable itself when stderr is not a terminal.
        disable=None if enabled else True,
        file=sys.stderr,
        leave=True,
    )


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    size_bytes: int | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its sha256 while streaming.

    The body is written to ``<dest>.part-<random>`` in the destination directory, flushed to disk,
    and renamed onto ``dest`` with :func:`os.replace` only after every check passed. On any failure
    (including ``KeyboardInterrupt``) the temporary file is removed and ``dest`` is left untouched.

    Args:
        url: http(s) (or file) URL.
        dest: Final file path; its directory is created if missing.
        sha256: Expected full hex digest (exact comparison).
        sha256_prefix: Expected leading hex digits, used only when ``sha256`` is ``None``.
        size_bytes: Expected size in bytes, if known.
        progress: Show a byte progress bar (on a terminal) sized from ``Content-Length``.
        timeout: Socket timeout in seconds for connecting and for each read.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ConnectionError: the server could not be reached, answered with an HTTP error, or the
            connection broke before the whole body arrived.
        ValueError: the digest or size of the downloaded data is wrong.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{secrets.token_hex(6)}")
    manual = f"You can download it manually from {url} and save it as {dest}."

    def fail(reason: str) -> ConnectionError:
        return ConnectionError(f"download of {url} failed: {reason}. {manual}")

    digest = hashlib.sha256()
    received = 0
    try:
        with open(tmp, "xb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "anyseg"})
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as e:
                raise fail(f"HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise fail(str(getattr(e, "reason", e) or type(e).__name__)) from e
            with response:
                length_header = response.headers.get("Content-Length")
                total = int(length_header) if length_header and length_header.isdigit() else None
                if total is not None and size_bytes is not None and total != size_bytes:
                    raise ValueError(
                        f"{url} reports {total} bytes, expected {size_bytes}; refusing to download "
                        f"a different file. {manual}"
                    )
                bar = _progress_bar(total or size_bytes, dest.name, progress)
                try:
                    while True:
                        try:
                            chunk = response.read(_CHUNK)
                        except (OSError, http.client.HTTPException) as e:
                            raise fail(
                                f"connection broke after {received} bytes ({type(e).__name__}: {e})"
                            ) from e
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
            if total is not None and received != total:
                raise fail(f"connection closed after {received} of {total} bytes")
            if size_bytes is not None and received != size_bytes:
                raise ValueError(
                    f"downloaded {received} bytes from {url}, expected {size_bytes}. {manual}"
                )
            actual = digest.hexdigest()
            if not _digest_ok(actual, sha256, sha256_prefix):
                raise ValueError(
                    f"sha256 mismatch for {url}: expected {_expected_text(sha256, sha256_prefix)}, "
                    f"got {actual}. The file was discarded; retry, or check the URL. {manual}"
                )
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)
    if sha256 is not None or sha256_prefix is not None:
        _write_sidecar(dest, actual)
    return dest


# resolve_checkpoint has a keyword argument named ``download``.
_download = download
