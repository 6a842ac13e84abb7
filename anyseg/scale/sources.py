"""Inputs of a scaled run: local files, folders and globs (as ``anyseg auto``) or pyarrow-filesystem URIs.

A URI is anything with a scheme that pyarrow's ``FileSystem.from_uri`` understands (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``hdfs://...``, ``file:///abs/path``); it names one object, a prefix (listed
recursively, image extensions only) or a pattern whose glob characters (``*``, ``?``, ``[...]``) are
matched against the listed keys. Every source comes with its size and modification time, which is what
the finished-image markers compare. Imports pyarrow only when a URI is given; never Ray.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..cli.auto import Job, name_jobs, plan_jobs

_GLOB = frozenset("*?[")


@dataclass
class Source:
    job: Job
    uri: Optional[str]  # pyarrow-filesystem URI, or None for a local file (job.path)
    stamp: Dict[str, int]  # source_size, source_mtime_ns

    @property
    def location(self) -> str:
        return self.uri if self.uri is not None else str(self.job.path)


def is_uri(text: str) -> bool:
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isalnum() and len(scheme) > 1  # 'C://' style drive letters are not URIs


def plan_sources(inputs: Sequence[str], outdir: Path) -> List[Source]:
    """Expand the inputs into :class:`Source` items, numbered and named exactly as ``anyseg auto`` does."""
    uris = [i for i in inputs if is_uri(i)]
    if not uris:
        out = []
        for job in plan_jobs(inputs, outdir):
            st = os.stat(job.path)
            out.append(Source(job, None, {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}))
        return out
    if len(uris) != len(inputs):
        raise ValueError("INPUT: give either local paths or file-system URIs (s3://..., gs://...), not both")
    return _plan_uris(uris)


def filesystem(uri: str):
    """``(pyarrow FileSystem, path)`` for a URI, with a clear error for an unsupported one."""
    try:
        from pyarrow import fs as pafs
    except ImportError as exc:  # pragma: no cover - pyarrow comes with the ray extra
        raise ValueError(f"reading '{uri}' needs pyarrow: pip install \"anyseg[ray]\"") from exc
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / ArrowNotImplemented / OSError
        raise ValueError(f"'{uri}': expected a URI that pyarrow's file systems support "
                         f"(s3://, gs://, hdfs://, file:///...): {exc}") from exc


def read_uri(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def _plan_uris(uris: Sequence[str]) -> List[Source]:
    from pyarrow import fs as pafs

    from ..imageio import IMAGE_EXTENSIONS

    found: Dict[str, Tuple[str, str, Dict[str, int]]] = {}  # uri -> (root prefix, key, stamp)
    for uri in uris:
        scheme, _, rest = uri.partition("://")
        parts = rest.split("/")
        glob_at = next((i for i, part in enumerate(parts) if _GLOB & set(part)), None)
        base_uri = f"{scheme}://{'/'.join(parts[:glob_at])}" if glob_at is not None else uri
        fs, base = filesystem(base_uri)  # URI parsers reject glob characters: resolve the part before them
        path = base.rstrip("/") + "/" + "/".join(parts[glob_at:]) if glob_at is not None else base
        scheme_prefix = base_uri[: len(base_uri) - len(base)] if base and base_uri.endswith(base) else None
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and glob_at is None:
            infos, root = [info], posixpath.dirname(base)
        elif info.type == pafs.FileType.Directory:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                     if i.type == pafs.FileType.File and not any(p.startswith(".") for p in
                                                                 posixpath.relpath(i.path, base).split("/"))]
            if glob_at is not None:
                infos = [i for i in infos if fnmatch.fnmatchcase(i.path, path)]
            infos = [i for i in infos if posixpath.splitext(i.path)[1].lower() in IMAGE_EXTENSIONS]
            root = base
        else:
            raise FileNotFoundError(f"no such object or prefix: '{uri}'")
        if not infos:
            raise FileNotFoundError(f"no images found at '{uri}'")
        for i in infos:
            full = (scheme_prefix + i.path) if scheme_prefix is not None else f"{uri.split('://')[0]}://{i.path}"
            stamp = {"source_size": int(i.size or 0), "source_mtime_ns": int(i.mtime_ns or 0)}
            found.setdefault(full, (root.rstrip("/"), i.path, stamp))
    roots = sorted({root for root, _, _ in found.values()})
    common = posixpath.commonpath(roots) if all(r.startswith("/") for r in roots) or \
        not any(r.startswith("/") for r in roots) else ""
    by_rel = {}
    for full, (_, key, stamp) in found.items():
        rel = posixpath.relpath(key, common) if common else key
        by_rel[rel] = (full, stamp)
    jobs = name_jobs((rel, full) for rel, (full, _) in by_rel.items())
    return [Source(job, by_rel[job.rel][0], by_rel[job.rel][1]) for job in jobs]
