"""SAM 3's text tokenizer (spec/sam3.md section 5): CLIP's byte-level BPE at context 32.

The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` is not fetched at run time. It is taken, in
order, from: the ``ANYSEG_CLIP_BPE`` environment variable; a folder given by the caller (the
checkpoint's folder); an installed package that ships the same file (``open_clip_torch``, or
OpenAI's ``clip`` as packaged by ``clip-anytorch``). The file's SHA-256 is checked. Those packages
need not be importable: only the file beside their sources is read, so ``pip install --no-deps
open_clip_torch`` is enough (and leaves the installed torch alone).

Text cleaning uses ``ftfy`` and ``regex`` (the ``anyseg[sam3]`` extra).
"""
from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ClipTokenizer", "VOCAB_FILE", "VOCAB_SHA256", "find_vocab", "get_tokenizer"]

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
START, END = "<start_of_text>", "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2
_PACKAGES = ("open_clip", "clip")


class VocabularyNotFound(FileNotFoundError):
    """The CLIP BPE vocabulary is not on this machine."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_file(package: str) -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / VOCAB_FILE
        if candidate.is_file():
            return candidate
    return None


def find_vocab(search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> Path:
    """The vocabulary file, checked against its SHA-256; raises :class:`VocabularyNotFound` saying where
    it was looked for and how to provide it."""
    candidates: List[Tuple[str, Optional[Path]]] = []
    env = os.environ.get("ANYSEG_CLIP_BPE")
    if env:
        candidates.append(("ANYSEG_CLIP_BPE", Path(env)))
    for folder in search_dirs:
        candidates.append((f"folder {folder}", Path(folder) / VOCAB_FILE))
    for package in _PACKAGES:
        candidates.append((f"package {package}", _package_file(package)))
    looked = []
    for where, path in candidates:
        if path is None or not path.is_file():
            looked.append(where)
            continue
        actual = _sha256(path)
        if actual != VOCAB_SHA256:
            raise ValueError(f"{path} (from {where}) is not the CLIP BPE vocabulary: sha256 {actual}, "
                             f"expected {VOCAB_SHA256}")
        return path
    raise VocabularyNotFound(
        f"the CLIP BPE vocabulary {VOCAB_FILE} (needed to read SAM 3 text prompts) was not found "
        f"(looked in: {', '.join(looked)}). Install a package that ships it without touching torch: "
        f"`pip install --no-deps open_clip_torch` (and `pip install anyseg[sam3]` for ftfy / regex), or put "
        f"the file beside the checkpoint, or set ANYSEG_CLIP_BPE to its path.")


def bytes_to_unicode() -> Dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the rest to 256 + n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clean(text: str) -> str:
    """ftfy, HTML-unescape twice, collapse whitespace, lower-case (the reference's "lower" cleaning)."""
    try:
        import ftfy
    except ImportError as exc:
        raise ImportError("SAM 3 text prompts need ftfy: pip install 'anyseg[sam3]'") from exc
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """``tokenizer(texts, context_length=32)`` -> ``N x context_length`` int64 ids, zero-padded; a longer
    sequence is cut and ends with the end token."""

    def __init__(self, vocab_path: Union[str, os.PathLike]) -> None:
        try:
            import regex
        except ImportError as exc:
            raise ImportError("SAM 3 text prompts need regex: pip install 'anyseg[sam3]'") from exc
        self.byte_encoder = bytes_to_unicode()
        with gzip.open(vocab_path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.pattern = regex.compile(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)
        self._cache: Dict[str, List[str]] = {START: [START], END: [END]}

    def bpe(self, piece: str) -> List[str]:
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> List[int]:
        """BPE ids of ``text`` (cleaned), without start / end tokens."""
        ids: List[int] = []
        for piece in self.pattern.findall(clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(piece))
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = 32) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id] + self.encode(text) + [self.end_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.end_id
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=4)
def _tokenizer_at(path: str) -> ClipTokenizer:
    return ClipTokenizer(path)


def get_tokenizer(search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> ClipTokenizer:
    """The shared tokenizer (the vocabulary is read once per process)."""
    return _tokenizer_at(str(find_vocab(tuple(search_dirs))))
