"""Model output → probabilities → label mask → findings (connected components, measurements).

Pure numpy. scipy's ``ndimage.label`` is used for connected components when
scipy is installed; otherwise a vectorised union-find gives the same labelling
(face connectivity, components numbered in raster order of their first voxel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicomnode.modelpkg.format1 import OutputContract

__all__ = [
    "Finding",
    "activate",
    "assign_labels",
    "connected_components",
    "find_components",
    "long_and_short_axis",
    "max_diameter",
]

try:  # optional accelerator; the numpy fallback below gives the same labels
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - depends on the environment
    _ndimage = None


@dataclass(frozen=True)
class Finding:
    """One connected component of one label, measured on the original grid.

    Distances are between voxel centres, so a component one voxel wide has a
    diameter of 0 and an edge-to-edge size is about one voxel larger.
    """

    label: int
    """Label number (``Label.number`` of the package)."""
    label_name: str
    index: int
    """1-based, per label, largest component first."""
    voxel_count: int
    volume_mm3: float
    max_diameter_mm: float
    """Largest 3D distance between two voxel centres of the component."""
    max_axial_diameter_mm: float
    """Largest in-plane distance within any one slice (a RECIST-like long axis)."""
    mean_value: float
    """Mean of the input volume over the component, in its real units (HU for CT)."""
    centroid_voxel: tuple[float, float, float]
    """(z, y, x) mean voxel index."""
    bbox: tuple[int, int, int, int, int, int]
    """(z0, y0, x0, z1, y1, x1), end-exclusive voxel indices."""
    short_axis_mm: float = 0.0
    """Largest extent perpendicular to the long axis (``max_axial_diameter_mm``), in the
    slice of the long axis (RECIST's short axis); 0 when the long axis is 0."""


def activate(out: np.ndarray, outputs: OutputContract) -> np.ndarray:
    """Graph output (N, C, ...) → probabilities (float32, new array), per the contract.

    ``kind = "probabilities"`` passes through; logits get a sigmoid per channel or
    a softmax over the channels.
    """
    x = np.asarray(out, dtype=np.float32)
    if outputs.kind == "probabilities":
        return np.array(x, dtype=np.float32, copy=True)
    if outputs.activation == "sigmoid":
        # The tanh form never overflows (exp(-x) does for x < -88 in float32).
        p = np.tanh(x * np.float32(0.5))
        p += np.float32(1.0)
        p *= np.float32(0.5)
        return p
    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def assign_labels(probs: np.ndarray, outputs: OutputContract) -> np.ndarray:
    """Probabilities (N, C, y, x) → label numbers (N, y, x) uint8.

    A voxel gets the most probable label whose probability reaches that label's
    threshold, else 0. With softmax, channel 0 is background and wins when it is
    the most probable.
    """
    thr = np.array([lb.threshold for lb in outputs.labels], dtype=np.float32)
    if outputs.activation == "sigmoid":
        if len(thr) == 1:
            return (probs[:, 0] >= thr[0]).astype(np.uint8)
        scored = np.where(probs >= thr[None, :, None, None], probs, np.float32(-1.0))
        best = scored.argmax(axis=1)
        hit = np.take_along_axis(scored, best[:, None], axis=1)[:, 0] >= 0
        return np.where(hit, best + 1, 0).astype(np.uint8)
    best = probs.argmax(axis=1)
    p_best = np.take_along_axis(probs, best[:, None], axis=1)[:, 0]
    thr_full = np.concatenate([[np.inf], thr]).astype(np.float32)
    return np.where((best > 0) & (p_best >= thr_full[best]), best, 0).astype(np.uint8)


def connected_components(
    mask: np.ndarray, *, use_scipy: bool | None = None
) -> tuple[np.ndarray, int]:
    """Label the face-connected components of a boolean 3D array.

    Parameters
    ----------
    mask
        Foreground where true (any shape; any dtype, non-zero = foreground).
    use_scipy
        None: scipy if installed. False: the numpy union-find (same result).

    Returns
    -------
    (labels, n)
        int32 array of mask's shape, 0 = background, components numbered 1..n in
        raster order of their first voxel (as ``scipy.ndimage.label``).
    """
    mask = np.asarray(mask) != 0
    if (use_scipy is None and _ndimage is not None) or use_scipy:
        if _ndimage is None:
            raise ImportError("scipy is not installed")
        labels, n = _ndimage.label(mask)
        return labels.astype(np.int32, copy=False), int(n)
    return _label_union_find(mask)


def _label_union_find(mask: np.ndarray) -> tuple[np.ndarray, int]:
    out = np.zeros(mask.shape, dtype=np.int32)
    if not mask.any():
        return out, 0
    # Work in the foreground's bounding box: memory then scales with the findings,
    # not with the study.
    nz = np.nonzero(mask)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in nz)
    sub = mask[box]
    fg = np.flatnonzero(sub)  # sorted flat indices; node id = position in fg
    a_parts, b_parts = [], []
    strides = np.cumprod((sub.shape[1:] + (1,))[::-1])[::-1]
    for axis in range(sub.ndim):
        lo = [slice(None)] * sub.ndim
        hi = [slice(None)] * sub.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        both = sub[tuple(lo)] & sub[tuple(hi)]
        coords = np.nonzero(both)
        idx = np.ravel_multi_index(coords, sub.shape)
        a_parts.append(np.searchsorted(fg, idx))
        b_parts.append(np.searchsorted(fg, idx + strides[axis]))
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    parent = np.arange(fg.size, dtype=np.int64)
    # Hook-and-compress: parent[x] <= x always, so no cycles; every round either
    # merges trees or ends. Edges already inside one tree stay there and are dropped.
    while a.size:
        ra, rb = parent[a], parent[b]
        keep = ra != rb
        if not keep.any():
            break
        a, b, ra, rb = a[keep], b[keep], ra[keep], rb[keep]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    # Roots are the smallest flat index of their component: np.unique numbers them
    # in raster order of the first voxel, as scipy does.
    _, ids = np.unique(parent, return_inverse=True)
    sub_out = np.zeros(sub.shape, dtype=np.int32)
    sub_out.ravel()[fg] = ids.astype(np.int32) + 1
    out[box] = sub_out
    return out, int(ids.max()) + 1


def _fibonacci_directions(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - i / n)  # upper hemisphere: a direction and its opposite are the same
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], axis=1)


_DIRS = _fibonacci_directions(512)


def max_diameter(points: np.ndarray, exact_limit: int = 3000) -> float:
    """Largest distance between two of ``points`` (n, d).

    Exact for up to ``exact_limit`` points. Beyond, the exact maximum over the
    extreme points along 512 directions, which can only underestimate, by well
    under 1 % for blob-like shapes.
    """
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        return 0.0
    if len(pts) > exact_limit:
        dirs = _DIRS[:, : pts.shape[1]]
        proj = pts @ dirs.T
        pts = pts[np.unique(np.concatenate([proj.argmax(0), proj.argmin(0)]))]
    best = 0.0
    for start in range(0, len(pts), 256):
        chunk = pts[start : start + 256]
        d2 = ((chunk[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return best**0.5


def long_and_short_axis(points: np.ndarray) -> tuple[float, float]:
    """In-plane (n, 2) points (mm) → (long axis, short axis).

    The long axis is the largest distance between two points (exact, as
    :func:`max_diameter`); the short axis is the extent of the points perpendicular to
    it (the width of the thinnest band along the long axis that holds them, which is
    the longest perpendicular chord for a convex region).
    """
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        return 0.0, 0.0
    cand = pts
    if len(pts) > 3000:  # as max_diameter: the extreme points along many directions
        angles = np.linspace(0.0, np.pi, 512, endpoint=False)
        proj = pts @ np.stack([np.cos(angles), np.sin(angles)])
        cand = pts[np.unique(np.concatenate([proj.argmax(0), proj.argmin(0)]))]
    best, pair = -1.0, (0, 0)
    for start in range(0, len(cand), 256):
        chunk = cand[start : start + 256]
        d2 = ((chunk[:, None, :] - cand[None, :, :]) ** 2).sum(-1)
        k = int(d2.argmax())
        if d2.flat[k] > best:
            best = float(d2.flat[k])
            pair = (start + k // len(cand), k % len(cand))
    long_axis = best**0.5
    if long_axis == 0.0:
        return 0.0, 0.0
    u = (cand[pair[1]] - cand[pair[0]]) / long_axis
    perp = pts @ np.array([-u[1], u[0]])
    return long_axis, float(perp.max() - perp.min())


def _boundary(sub: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Voxels of ``sub`` with a face neighbour outside it, along ``axes``."""
    padded = np.pad(sub, 1)
    inner = padded.copy()
    for axis in axes:
        inner[1:-1, 1:-1, 1:-1] &= np.roll(padded, 1, axis)[1:-1, 1:-1, 1:-1]
        inner[1:-1, 1:-1, 1:-1] &= np.roll(padded, -1, axis)[1:-1, 1:-1, 1:-1]
    return sub & ~inner[1:-1, 1:-1, 1:-1]


def find_components(
    mask: np.ndarray,
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    label_names: dict[int, str],
    *,
    min_volume_mm3: float = 0.0,
    max_per_label: int = 200,
) -> tuple[np.ndarray, tuple[Finding, ...]]:
    """Measure every connected component of every label of ``mask``.

    Parameters
    ----------
    mask
        (z, y, x) uint8 label numbers.
    volume
        (z, y, x) input in real units (for ``mean_value``).
    spacing
        (dz, dy, dx) in mm.
    label_names
        Label number → name; numbers not in it are ignored.
    min_volume_mm3
        Components smaller than this are removed from the mask and not reported.
    max_per_label
        At most this many components per label are measured and reported, the largest
        first; smaller ones stay in the mask. A noisy output can hold hundreds of
        thousands of specks, and a report of each helps nobody (and would take minutes).

    Returns
    -------
    (mask, findings)
        The mask with small components removed (the input when none were), and
        the findings ordered by label, then size (largest first).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    voxel_mm3 = float(np.prod(sp))
    values = np.ravel(volume)  # once: a view, or one copy for a non-contiguous volume
    findings: list[Finding] = []
    cleaned = mask
    for number, name in sorted(label_names.items()):
        comp, n = connected_components(mask == number)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        small = np.flatnonzero(sizes[1:] * voxel_mm3 < min_volume_mm3) + 1
        if small.size:
            if cleaned is mask:
                cleaned = mask.copy()
            cleaned[np.isin(comp, small)] = 0
        kept = np.flatnonzero(sizes[1:] * voxel_mm3 >= min_volume_mm3) + 1
        measured = set(kept[np.argsort(-sizes[kept], kind="stable")][:max_per_label].tolist())
        flat = np.flatnonzero(np.isin(comp, list(measured))) if measured else np.array([], int)
        ids = comp.ravel()[flat]
        order = np.argsort(ids, kind="stable")
        flat, ids = flat[order], ids[order]
        per_label = []
        for k in sorted(measured):
            lo_i, hi_i = np.searchsorted(ids, k), np.searchsorted(ids, k, side="right")
            idx = flat[lo_i:hi_i]
            zyx = np.stack(np.unravel_index(idx, mask.shape), axis=1)
            lo, hi = zyx.min(0), zyx.max(0) + 1
            sub = comp[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == k
            surf = np.argwhere(_boundary(sub, (0, 1, 2))) + lo
            rim = np.argwhere(_boundary(sub, (1, 2))) + lo
            axial, short = 0.0, 0.0
            for z in np.unique(rim[:, 0]):
                long_z, short_z = long_and_short_axis(rim[rim[:, 0] == z, 1:] * sp[1:])
                if long_z > axial:
                    axial, short = long_z, short_z
            per_label.append(
                (
                    idx.size,
                    float(values[idx].mean(dtype=np.float64)),
                    tuple(float(c) for c in zyx.mean(0)),
                    tuple(int(v) for v in (*lo, *hi)),
                    max_diameter(surf * sp),
                    axial,
                    short,
                )
            )
        per_label.sort(key=lambda t: -t[0])
        for i, (count, mean, centroid, bbox, diam, axial, short) in enumerate(
            per_label, start=1
        ):
            findings.append(
                Finding(
                    label=number,
                    label_name=name,
                    index=i,
                    voxel_count=int(count),
                    volume_mm3=count * voxel_mm3,
                    max_diameter_mm=diam,
                    max_axial_diameter_mm=axial,
                    mean_value=mean,
                    centroid_voxel=centroid,  # type: ignore[arg-type]
                    bbox=bbox,  # type: ignore[arg-type]
                    short_axis_mm=short,
                )
            )
    return cleaned, tuple(findings)
