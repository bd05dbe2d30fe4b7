"""Token-grid partition utilities shared by the region methods.

Why: every method must hand downstream code the same guarantees (each region
a contiguous set of tokens on the token grid, all tokens covered, exactly K
regions or a reported fewer). Ward with grid connectivity gets them by
construction; methods that work in pixel space (SLIC) or produce labels some
other way are repaired here: split into 4-connected components, then merge the
smallest pieces into their most similar neighbour until K remain.
"""

from __future__ import annotations

import numpy as np

__all__ = ["relabel_raster", "split_components", "merge_to_k", "is_contiguous", "grid_shape"]


def grid_shape(grid_thw: tuple[int, int, int]) -> tuple[int, ...]:
    """Shape of the token grid as an array: (h, w) for images, (t, h, w) for videos."""
    t, h, w = grid_thw
    return (h, w) if t == 1 else (t, h, w)


def relabel_raster(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..K-1 in order of first appearance in raster order.

    Deterministic ids (region 0 starts at the top-left token) make maps built
    from the same tree comparable and easy to read.
    """
    flat = np.asarray(labels).reshape(-1)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)].reshape(np.shape(labels))


def split_components(labels: np.ndarray) -> np.ndarray:
    """Give every 4-connected (6-connected in 3-D) piece of a label its own label."""
    from scipy import ndimage

    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, dtype=np.int64)
    nxt = 0
    for v in np.unique(labels):
        comp, n = ndimage.label(labels == v)
        sel = comp > 0
        out[sel] = comp[sel] - 1 + nxt
        nxt += n
    return relabel_raster(out)


def is_contiguous(labels: np.ndarray) -> bool:
    """True when each label forms a single 4-connected (6-connected in 3-D) piece."""
    from scipy import ndimage

    labels = np.asarray(labels)
    return all(ndimage.label(labels == v)[1] == 1 for v in np.unique(labels))


def _adjacency(labels: np.ndarray) -> dict[int, dict[int, int]]:
    """Region adjacency with shared-border lengths (4-neighbourhood)."""
    adj: dict[int, dict[int, int]] = {}
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        x, y = a[:-1].reshape(-1), a[1:].reshape(-1)
        diff = x != y
        for i, j in zip(x[diff].tolist(), y[diff].tolist()):
            adj.setdefault(i, {}).setdefault(j, 0)
            adj.setdefault(j, {}).setdefault(i, 0)
            adj[i][j] += 1
            adj[j][i] += 1
    return adj


def merge_to_k(labels: np.ndarray, k: int, features: np.ndarray | None = None) -> np.ndarray:
    """Greedily merge contiguous regions until at most ``k`` remain; stays contiguous.

    The smallest region is merged into the adjacent region with the lowest Ward
    cost ``n_a n_b / (n_a + n_b) * ||mean_a - mean_b||^2`` on ``features``
    (N_tokens, D), or, without features, into the neighbour it shares the
    longest border with. Merging two adjacent connected regions keeps the
    result connected, so contiguity is preserved. Returns raster-ordered labels.
    """
    labels = relabel_raster(labels)
    n = int(labels.max()) + 1
    if n <= k:
        return labels
    flat = labels.reshape(-1)
    sizes = np.bincount(flat, minlength=n).astype(np.float64)
    means = None
    if features is not None:
        f = np.asarray(features, dtype=np.float64).reshape(flat.size, -1)
        sums = np.zeros((n, f.shape[1]))
        np.add.at(sums, flat, f)
        means = sums / sizes[:, None]
    adj = _adjacency(labels)
    parent = np.arange(n)
    alive = set(range(n))
    while len(alive) > k:
        s = min(alive, key=lambda r: (sizes[r], r))
        nbrs = adj.get(s, {})
        if not nbrs:  # an isolated region (cannot happen on a connected grid); stop rather than break contiguity
            break
        if means is not None:
            def cost(j: int) -> float:
                d = means[s] - means[j]
                return sizes[s] * sizes[j] / (sizes[s] + sizes[j]) * float(d @ d)
            j = min(nbrs, key=lambda r: (cost(r), r))
        else:
            j = max(nbrs, key=lambda r: (nbrs[r], -r))
        # merge s into j
        if means is not None:
            means[j] = (means[j] * sizes[j] + means[s] * sizes[s]) / (sizes[j] + sizes[s])
        sizes[j] += sizes[s]
        parent[s] = j
        alive.discard(s)
        for r, border in nbrs.items():
            if r == j:
                continue
            adj[r].pop(s, None)
            adj[r][j] = adj[r].get(j, 0) + border
            adj[j][r] = adj[j].get(r, 0) + border
        adj[j].pop(s, None)
        adj.pop(s, None)
    # resolve merge chains
    root = np.arange(n)
    for r in range(n):
        x = r
        while parent[x] != x:
            x = parent[x]
        root[r] = x
    return relabel_raster(root[labels])
