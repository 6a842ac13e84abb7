"""The reference ``segment_anything.utils`` module names, as thin adapters over anyseg.

- :mod:`anyseg.utils.transforms`: ``ResizeLongestSide`` (backed by :mod:`anyseg.geometry`);
- :mod:`anyseg.utils.amg`: the segment-everything helpers (backed by :mod:`anyseg.masks`);
- :mod:`anyseg.utils.onnx`: ``SamOnnxModel`` (backed by :mod:`anyseg.export.decoder`).

Nothing is imported here, so that ``import anyseg.utils.transforms`` does not pull in the ONNX
exporter. See ``docs/compat.md`` for the full table of reference names.
"""
