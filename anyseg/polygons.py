"""Masks as polygons: exact boundary tracing, simplification, rasterisation, COCO and YOLO export.

Coordinate frame: XY in pixel-corner coordinates of the mask. Pixel ``(row r, column c)`` is the unit
square ``[c, c+1] x [r, r+1]``, so a traced polygon follows the pixel edges and covers exactly the set
pixels; a pixel belongs to a polygon when its centre ``(c + 0.5, r + 0.5)`` is inside.

Connectivity: set pixels that touch only at a corner belong to the same polygon by default
(``connectivity=8``, as in SAM's small-region removal); unset pixels are then 4-connected, so a hole
is a 4-connected region of unset pixels enclosed by the object. With ``connectivity=4`` it is the
other way round. Where two set pixels touch only diagonally (8-connectivity) the ring passes through
the shared corner twice; it does not cross itself.

Rings are lists of ``(x, y)`` float vertices, not closed (the last vertex is not repeated), with only
the corners kept. Exteriors run counter-clockwise as seen on screen (y pointing down), holes clockwise.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, NamedTuple, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "Polygon",
    "mask_to_polygons",
    "polygons_to_mask",
    "merge_rings",
    "to_coco_segmentation",
    "to_yolo_seg_line",
]

Ring = List[Tuple[float, float]]


class Polygon(NamedTuple):
    """One connected object: an exterior ring and the rings of its holes (XY, pixel corners)."""

    exterior: Ring
    holes: List[Ring]

    @property
    def area(self) -> float:
        """Area enclosed by the exterior minus the holes, in square pixels."""
        return abs(_signed_area(self.exterior)) - sum(abs(_signed_area(h)) for h in self.holes)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form: ``{"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}``."""
        return {
            "exterior": [[float(x), float(y)] for x, y in self.exterior],
            "holes": [[[float(x), float(y)] for x, y in hole] for hole in self.holes],
        }


# --------------------------------------------------------------------------------------------------
# Tracing


def mask_to_polygons(
    mask: np.ndarray, *, tolerance: float = 0.0, min_area: float = 0, connectivity: int = 8
) -> List[Polygon]:
    """Trace the boundary of a binary mask into polygons with holes.

    Args:
        mask: ``H x W`` boolean (or 0/non-zero) array.
        tolerance: Douglas-Peucker tolerance in pixels; ``0`` keeps the exact pixel boundary, so
            ``polygons_to_mask(mask_to_polygons(m), m.shape)`` gives ``m`` back. A ring that would
            shrink below three vertices is kept unsimplified.
        min_area: polygons whose area (holes subtracted) is below this many pixels are dropped, and
            holes smaller than it are filled.
        connectivity: ``8`` (default) or ``4``, how set pixels connect into one polygon.
    Returns:
        One :class:`Polygon` per connected component of set pixels, ordered by the component's first
        pixel in row-major order. Vertices are XY in pixel-corner coordinates.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask of shape H x W, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    mask = mask.astype(bool)
    rows_any = np.flatnonzero(mask.any(axis=1))
    if rows_any.size == 0:
        return []
    # Trace inside the bounding box only (SAM masks are full-image arrays holding a small object);
    # vertices are shifted back to the full mask's frame at the end.
    cols_any = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows_any[0]), int(cols_any[0])
    mask = mask[r0 : int(rows_any[-1]) + 1, c0 : int(cols_any[-1]) + 1]
    origin = np.array([c0, r0], dtype=np.float64)

    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, count = ndimage.label(mask, structure=structure)
    edges = _boundary_edges(mask)
    successor = _link_edges(edges, right_turn_at_saddles=(connectivity == 8))
    ring_of_edge, ring_order, ring_bounds = _cycles(successor)
    vertices, areas = _ring_vertices(edges, successor, ring_order, ring_bounds)

    # Every ring separates one component of set pixels from one region of unset pixels, so the ring's
    # component is that of any of its edges' pixels.
    first_edges = ring_order[ring_bounds[:-1]]
    component_of_ring = labels[edges.row[first_edges], edges.col[first_edges]]
    # The top edge of a component's first pixel (row-major) always lies on its exterior ring: the
    # pixel above it is unset and, being above the whole component, cannot be inside one of its holes.
    flat_labels = labels.ravel()
    set_index = np.flatnonzero(flat_labels)
    _, first_at = np.unique(flat_labels[set_index], return_index=True)  # labels 1..count
    first_rc = np.stack(np.unravel_index(set_index[first_at], labels.shape), axis=1)
    top_edge_at = np.full(mask.shape, -1, dtype=np.int64)
    top = np.flatnonzero(edges.side == _TOP)
    top_edge_at[edges.row[top], edges.col[top]] = top
    exterior_of = ring_of_edge[top_edge_at[first_rc[:, 0], first_rc[:, 1]]]

    holes_of: List[List[int]] = [[] for _ in range(count + 1)]
    is_exterior = np.zeros(len(areas), bool)
    is_exterior[exterior_of] = True
    for ring_id in np.flatnonzero(~is_exterior).tolist():
        holes_of[component_of_ring[ring_id]].append(ring_id)

    polygons = []
    for k in range(1, count + 1):
        ext = int(exterior_of[k - 1])
        holes = [h for h in holes_of[k] if areas[h] >= min_area]
        if areas[ext] - sum(areas[h] for h in holes) < min_area:
            continue
        rings = [vertices[ext] + origin] + [vertices[h] + origin for h in holes]
        if tolerance > 0:
            rings = [_simplify_ring(r, tolerance) for r in rings]
        rings = [list(map(tuple, r.tolist())) for r in rings]
        polygons.append(Polygon(rings[0], rings[1:]))
    return polygons


_TOP, _BOTTOM, _LEFT, _RIGHT = 0, 1, 2, 3


class _Edges(NamedTuple):
    """Directed unit edges between a set pixel and an unset neighbour, set pixel on the left."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    row: np.ndarray  # the set pixel the edge belongs to
    col: np.ndarray
    side: np.ndarray


def _boundary_edges(mask: np.ndarray) -> _Edges:
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    parts = []
    # (neighbour unset test, start corner offset, end corner offset) per side; walking each edge the
    # pixel lies on the left as seen on screen, so a lone pixel is traced (c,r)->(c,r+1)->(c+1,r+1)->(c+1,r).
    specs = (
        (_TOP, ~padded[:-2, 1:-1], (1, 0), (0, 0)),
        (_BOTTOM, ~padded[2:, 1:-1], (0, 1), (1, 1)),
        (_LEFT, ~padded[1:-1, :-2], (0, 0), (0, 1)),
        (_RIGHT, ~padded[1:-1, 2:], (1, 1), (1, 0)),
    )
    for side, neighbour_unset, (sx, sy), (ex, ey) in specs:
        rows, cols = np.nonzero(inner & neighbour_unset)
        parts.append((cols + sx, rows + sy, cols + ex, rows + ey, rows, cols, np.full(rows.shape, side)))
    return _Edges(*(np.concatenate([p[i] for p in parts]) for i in range(7)))


def _link_edges(edges: _Edges, *, right_turn_at_saddles: bool) -> np.ndarray:
    """For every edge, the index of the edge that follows it on its ring."""
    width = int(max(edges.x0.max(), edges.x1.max())) + 2
    start_key = edges.y0.astype(np.int64) * width + edges.x0
    end_key = edges.y1.astype(np.int64) * width + edges.x1
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    last = np.searchsorted(sorted_keys, end_key, side="right")
    n_out = last - first  # 1 at ordinary corners, 2 where two set pixels touch diagonally
    successor = order[first].copy()

    saddle = np.flatnonzero(n_out == 2)
    if saddle.size:
        dx = (edges.x1 - edges.x0)[saddle]
        dy = (edges.y1 - edges.y0)[saddle]
        # Turning right (screen, y down) keeps diagonal set pixels on one ring (8-connectivity);
        # turning left goes round the same pixel (4-connectivity).
        want_dx, want_dy = (-dy, dx) if right_turn_at_saddles else (dy, -dx)
        cand_a = order[first[saddle]]
        cand_b = order[first[saddle] + 1]
        a_matches = ((edges.x1 - edges.x0)[cand_a] == want_dx) & ((edges.y1 - edges.y0)[cand_a] == want_dy)
        successor[saddle] = np.where(a_matches, cand_a, cand_b)
    return successor


def _cycles(successor: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the successor permutation into cycles (rings).

    Returns the ring id of every edge, all edge indices ordered ring by ring along each ring, and the
    ``R + 1`` offsets of the rings in that order.
    """
    n = successor.size
    ring_of_edge = np.full(n, -1, dtype=np.int64)
    nxt = successor.tolist()
    seen = [False] * n
    order: List[int] = []
    bounds = [0]
    for start in range(n):
        if seen[start]:
            continue
        e = start
        while not seen[e]:
            seen[e] = True
            order.append(e)
            e = nxt[e]
        bounds.append(len(order))
    order_arr = np.asarray(order, dtype=np.int64)
    bounds_arr = np.asarray(bounds, dtype=np.int64)
    ring_of_edge[order_arr] = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds_arr))
    return ring_of_edge, order_arr, bounds_arr


def _ring_vertices(
    edges: _Edges, successor: np.ndarray, order: np.ndarray, bounds: np.ndarray
) -> Tuple[List[np.ndarray], np.ndarray]:
    """Corner vertices (``K x 2`` float) of every ring, and the area each ring encloses."""
    dx = edges.x1 - edges.x0
    dy = edges.y1 - edges.y0
    predecessor = np.empty_like(successor)
    predecessor[successor] = np.arange(successor.size)
    corner = (dx != dx[predecessor]) | (dy != dy[predecessor])
    corner_in_order = corner[order]
    points = np.stack([edges.x0[order], edges.y0[order]], axis=1).astype(np.float64)[corner_in_order]
    corners_per_ring = np.add.reduceat(corner_in_order.astype(np.int64), bounds[:-1])
    splits = np.cumsum(corners_per_ring)[:-1]
    # Shoelace over unit edges: each edge contributes x0 * y1 - x1 * y0.
    cross = (edges.x0 * edges.y1 - edges.x1 * edges.y0)[order].astype(np.float64)
    areas = np.abs(np.add.reduceat(cross, bounds[:-1])) / 2.0
    return np.split(points, splits), areas


def _signed_area_array(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _signed_area(ring: Sequence[Sequence[float]]) -> float:
    if len(ring) < 3:
        return 0.0
    return _signed_area_array(np.asarray(ring, dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# Simplification


def _simplify_ring(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring, anchored at the first vertex and the vertex farthest from it."""
    n = len(points)
    if n <= 3:
        return points
    far = int(np.argmax(np.sum((points - points[0]) ** 2, axis=1)))
    closed = np.concatenate([points, points[:1]])
    keep = np.zeros(n + 1, bool)
    keep[[0, far, n]] = True
    stack = [(0, far), (far, n)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = closed[i], closed[j]
        seg = closed[i + 1 : j]
        ab = b - a
        length = np.hypot(*ab)
        if length == 0:
            dist = np.hypot(*(seg - a).T)
        else:
            dist = np.abs(ab[0] * (seg[:, 1] - a[1]) - ab[1] * (seg[:, 0] - a[0])) / length
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            m = i + 1 + k
            keep[m] = True
            stack.extend([(i, m), (m, j)])
    simplified = closed[:-1][keep[:-1]]
    if len(simplified) < 3 or abs(_signed_area_array(simplified)) == 0:
        return points
    return simplified


# --------------------------------------------------------------------------------------------------
# Rasterisation


PolygonLike = Union[Polygon, Dict[str, Any], Sequence[float], Sequence[Sequence[float]]]


def _rings_of(polygon: PolygonLike) -> List[np.ndarray]:
    if isinstance(polygon, Polygon):
        rings = [polygon.exterior, *polygon.holes]
    elif isinstance(polygon, dict):
        if "exterior" not in polygon:
            raise ValueError(f"a polygon dict needs an 'exterior' key, got keys {sorted(polygon)}")
        rings = [polygon["exterior"], *polygon.get("holes", [])]
    else:
        rings = [polygon]  # a bare ring: [[x, y], ...] or flat [x0, y0, x1, y1, ...]
    out = []
    for ring in rings:
        arr = np.asarray(ring, dtype=np.float64)
        if arr.ndim == 1:
            if arr.size % 2:
                raise ValueError(f"a flat ring needs an even number of coordinates, got {arr.size}")
            arr = arr.reshape(-1, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"a ring must be K x 2 XY vertices, got shape {arr.shape}")
        if len(arr) >= 3:
            out.append(arr)
    return out


def polygons_to_mask(polygons: Iterable[PolygonLike], shape: Tuple[int, int]) -> np.ndarray:
    """Rasterise polygons into an ``H x W`` bool mask.

    Each polygon is filled as its exterior minus its holes (even-odd rule over its own rings), and the
    polygons are combined by union. A pixel is set when its centre ``(c + 0.5, r + 0.5)`` is inside;
    centres exactly on an edge follow the usual half-open rule (left and top edges are inside).

    Args:
        polygons: :class:`Polygon`s, dicts with ``exterior`` / ``holes``, or bare rings
            (``[[x, y], ...]`` or flat ``[x0, y0, x1, y1, ...]``), XY in pixel-corner coordinates.
        shape: ``(H, W)`` of the output.
    """
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), bool)
    for polygon in polygons:
        rings = _rings_of(polygon)
        if rings:
            out |= _fill_even_odd(rings, height, width)
    return out


def _fill_even_odd(rings: List[np.ndarray], height: int, width: int) -> np.ndarray:
    toggles = np.zeros((height, width + 1), np.int32)
    p0 = np.concatenate(rings)
    p1 = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    x0, y0, x1, y1 = p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]
    sloped = y0 != y1
    x0, y0, x1, y1 = x0[sloped], y0[sloped], x1[sloped], y1[sloped]
    # Orient every edge downwards so an edge walked both ways (a bridge) gives bit-identical crossings.
    up = y1 < y0
    x0, y0, x1, y1 = np.where(up, x1, x0), np.where(up, y1, y0), np.where(up, x0, x1), np.where(up, y0, y1)
    lo, hi = y0, y1
    # An edge crosses the centre lines y = r + 0.5 that lie in [lo, hi) (half-open, so a vertex shared
    # by two edges is counted once).
    r_start = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    r_stop = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)
    counts = np.maximum(r_stop - r_start, 0)
    if counts.sum() == 0:
        return np.zeros((height, width), bool)
    edge = np.repeat(np.arange(counts.size), counts)
    offsets = np.cumsum(counts) - counts
    rows = r_start[edge] + (np.arange(edge.size) - offsets[edge])
    ys = rows + 0.5
    xs = x0[edge] + (ys - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # A crossing flips every pixel whose centre c + 0.5 lies to its right.
    cols = np.clip(np.floor(xs - 0.5).astype(np.int64) + 1, 0, width)
    np.add.at(toggles, (rows, cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


# --------------------------------------------------------------------------------------------------
# Export


def merge_rings(rings: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """Join several rings into one ring through zero-width bridges.

    Each further ring ``k`` is attached through its vertex nearest to the earlier rings (those before
    ``2**floor(log2 k)``, which batches the searches): the path leaves the earlier ring at the nearest
    vertex, goes once round the new ring (from its attaching vertex back to it) and returns. Each
    bridge is walked once in each direction, so under the even-odd rule (and for pycocotools'
    rasteriser) it adds no area: holes stay holes and separate pieces stay separate. Takes
    ``O(K log^2 K)`` for ``K`` vertices. Returns ``(K + 2 * (rings - 1)) x 2`` XY vertices.
    """
    from scipy.spatial import cKDTree

    arrays = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings]
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return np.zeros((0, 2))
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    points = np.concatenate(arrays)
    # Ring k is attached at its vertex nearest to the rings before 2**floor(log2 k): one KD-tree and
    # one batched query per doubling of the ring count.
    children: Dict[int, List[Tuple[int, int]]] = {}  # global vertex -> [(ring, its attaching vertex)]
    lo = 1
    while lo < len(arrays):
        hi = min(2 * lo, len(arrays))
        dist, nearest = cKDTree(points[: offsets[lo]]).query(points[offsets[lo] : offsets[hi]])
        starts = offsets[lo:hi] - offsets[lo]
        ring_of = np.repeat(np.arange(lo, hi), np.diff(offsets[lo : hi + 1]))
        at_min = np.flatnonzero(dist == np.minimum.reduceat(dist, starts)[ring_of - lo])
        _, first = np.unique(ring_of[at_min], return_index=True)  # each ring's first nearest vertex
        j = at_min[first]
        for k, parent, local in zip(range(lo, hi), nearest[j].tolist(), (j - starts).tolist()):
            children.setdefault(parent, []).append((k, local))
        lo = hi

    # Walk ring 0; at a vertex with attached rings, go round each of them (recursively) and come back.
    has_child = np.zeros(len(points), bool)
    has_child[list(children)] = True
    ring_has_child = np.add.reduceat(has_child, offsets[:-1]) > 0
    order: List[np.ndarray] = []
    stack: List[Any] = [(0, 0, -1)]  # vertex index arrays to emit, or (ring, first vertex, return vertex)
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            order.append(item)
            continue
        k, first, back = item
        n = len(arrays[k])
        verts = (first + np.arange(n)) % n + offsets[k]
        if back >= 0:  # an attached ring closes on its first vertex, then returns to ``back``
            verts = np.concatenate([verts, verts[:1], [back]])
        if not ring_has_child[k]:
            order.append(verts)
            continue
        tasks: List[Any] = []
        pos = 0
        for hit in np.flatnonzero(has_child[verts[:n]]).tolist():
            tasks.append(verts[pos : hit + 1])
            pos = hit + 1
            tasks.extend((ring, j, int(verts[hit])) for ring, j in children[int(verts[hit])])
        tasks.append(verts[pos:])
        stack.extend(reversed(tasks))
    return points[np.concatenate(order)]


def to_coco_segmentation(polygons: Sequence[PolygonLike]) -> List[List[float]]:
    """COCO polygon segmentation: a list of flat ``[x0, y0, x1, y1, ...]`` lists, one per polygon.

    COCO polygons cannot have holes (pycocotools takes the union of the listed polygons). A polygon
    with holes is therefore exported as one ring that reaches each hole through a zero-width bridge
    (see :func:`merge_rings`); pycocotools decodes it to the exterior minus the holes. Coordinates
    are pixel-corner XY, which is how pycocotools rasterises them.
    """
    out = []
    for polygon in polygons:
        rings = _rings_of(polygon)
        if not rings:
            continue
        ring = rings[0] if len(rings) == 1 else merge_rings(rings)
        out.append([float(v) for v in ring.reshape(-1)])
    return out


def to_yolo_seg_line(class_id: int, polygons: Sequence[PolygonLike], width: int, height: int) -> str:
    """One line of a YOLO segmentation label file: ``class x1 y1 x2 y2 ...``.

    Coordinates are divided by the image ``width`` and ``height`` (so they lie in ``[0, 1]``) and
    written with 6 decimals. YOLO allows a single ring per object, so all polygons and their holes are
    joined by zero-width bridges (:func:`merge_rings`); an object with no polygon gives ``""``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    rings = [r for p in polygons for r in _rings_of(p)]
    if not rings:
        return ""
    ring = merge_rings(rings) / np.array([width, height], dtype=np.float64)
    ring = np.clip(ring, 0.0, 1.0)
    coords = " ".join(map("{:.6f}".format, ring.reshape(-1).tolist()))
    return f"{int(class_id)} {coords}"
