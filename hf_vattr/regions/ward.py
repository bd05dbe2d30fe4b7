"""Ward agglomerative clustering of token features on the token grid.

Why Ward with a grid connectivity graph: merges are only allowed between
clusters that touch on the token grid (4-neighbourhood; in a video also the
same cell in the neighbouring frame groups), so every region is a
contiguous patch of tokens by construction, and the result is a binary merge
tree. Cutting that tree after ``N - K`` merges yields *exactly* K regions for
any K <= N, so the tree is built once and serves every K the user asks for
(16/32/64/128 cost one clustering plus a few milliseconds each), and the
regions at a coarse K are unions of the regions at a finer K.

We call :func:`sklearn.cluster.ward_tree` (what ``AgglomerativeClustering(
linkage="ward", connectivity=grid_to_graph(h, w), compute_full_tree=True)``
runs inside) and cut its ``children_`` ourselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from ..layouts import ImageTokens
from .map import RegionMap
from .partition import relabel_raster
from .policy import KPolicy, resolve_k

__all__ = ["WardTree", "build_ward_tree", "ward_regions", "prepare_features"]


def prepare_features(features: torch.Tensor | np.ndarray, *, normalize: bool = True,
                     max_dim: int | None = None) -> np.ndarray:
    """(N, D) features -> float64 array ready for Ward.

    ``normalize`` L2-normalises each token (cosine geometry: ViT features carry
    large norm outliers, e.g. register-like tokens, that would otherwise
    dominate the squared distances). ``max_dim`` optionally projects wider
    features on their top principal components; off by default because Ward
    on ~1,000 tokens is already fast at LLM width (about 0.1 s at 4096 dims)
    and the projection costs more than it saves.
    """
    x = torch.as_tensor(features).detach().to("cpu", torch.float32)
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    if not torch.isfinite(x).all():
        raise ValueError("Token features contain NaN or inf; check the feature extractor's dtype / inputs.")
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    if max_dim is not None and x.shape[1] > max_dim and x.shape[0] > max_dim:
        xc = x - x.mean(0, keepdim=True)
        with torch.random.fork_rng(devices=[]):  # pca_lowrank is randomised; deterministic, global RNG untouched
            torch.manual_seed(0)
            _, _, v = torch.pca_lowrank(xc, q=max_dim, center=False, niter=2)
        x = xc @ v
    return x.double().numpy()


@dataclass
class WardTree:
    """A full Ward merge tree over the tokens of one image; cut it at any K.

    ``children[j] = (a, b)`` merges nodes a and b into node ``n_leaves + j``
    (scikit-learn's ``children_`` convention: nodes below ``n_leaves`` are tokens).
    """

    children: np.ndarray  # (N - 1, 2) int
    grid_thw: tuple[int, int, int]
    info: dict = field(default_factory=dict)

    @property
    def n_leaves(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    def labels_many(self, ks: Iterable[int]) -> dict[int, np.ndarray]:
        """Token labels for several K in one pass over the merges (cheapest first)."""
        n = self.n_leaves
        wanted = sorted({int(k) for k in ks}, reverse=True)
        for k in wanted:
            if not 1 <= k <= n:
                raise ValueError(f"K={k} is outside 1..{n} (the number of visual tokens of this image).")
        cid = np.arange(n)  # current cluster node of each token
        members: dict[int, np.ndarray] = {}
        out: dict[int, np.ndarray] = {}
        done = 0  # merges applied so far
        for k in wanted:
            target = n - k
            while done < target:
                a, b = (int(v) for v in self.children[done])
                ma = members.pop(a) if a >= n else np.array([a])
                mb = members.pop(b) if b >= n else np.array([b])
                m = np.concatenate([ma, mb])
                node = n + done
                members[node] = m
                cid[m] = node
                done += 1
            out[k] = relabel_raster(cid)
        return out

    def labels(self, k: int) -> np.ndarray:
        """(N,) region label per token, exactly ``k`` regions, numbered in raster order."""
        return self.labels_many([k])[int(k)]

    def region_map(self, image: ImageTokens, k: int, method: str = "ward", info: dict | None = None) -> RegionMap:
        """The K-region :class:`RegionMap` of this tree for ``image``."""
        if tuple(image.grid_thw) != tuple(self.grid_thw):
            raise ValueError(f"The tree was built on grid {self.grid_thw}, the image has {image.grid_thw}.")
        return _hard_map(image, self.labels(k), method, {**self.info, **(info or {})})

    def to_dict(self) -> dict:
        return {"children": self.children.tolist(), "grid_thw": list(self.grid_thw), "info": self.info}

    @classmethod
    def from_dict(cls, data: dict) -> "WardTree":
        children = np.asarray(data["children"], dtype=np.int64).reshape(-1, 2)
        return cls(children, tuple(data["grid_thw"]), dict(data.get("info", {})))


def _hard_map(image: ImageTokens, labels: np.ndarray, method: str, info: dict) -> RegionMap:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    membership = np.zeros((labels.size, int(labels.max()) + 1), dtype=np.float32)
    membership[np.arange(labels.size), labels] = 1.0
    return RegionMap(image, torch.from_numpy(membership), method, info)


def build_ward_tree(features: torch.Tensor | np.ndarray, grid_thw: Sequence[int], *, normalize: bool = True,
                    max_dim: int | None = None, info: dict | None = None) -> WardTree:
    """Build the full Ward tree of (N_tokens, D) ``features`` laid out row-major on ``grid_thw``."""
    from sklearn.cluster import ward_tree
    from sklearn.feature_extraction.image import grid_to_graph

    t, h, w = (int(v) for v in grid_thw)
    n = t * h * w
    if len(features) != n:
        raise ValueError(f"Got features for {len(features)} tokens but the grid {tuple(grid_thw)} has {n}.")
    info = dict(info or {})
    if n == 1:
        return WardTree(np.zeros((0, 2), dtype=np.int64), (t, h, w), info)
    x = prepare_features(features, normalize=normalize, max_dim=max_dim)
    # grid_to_graph(a, b[, c]) numbers vertex (i, j[, l]) row-major, matching the token order.
    connectivity = grid_to_graph(h, w) if t == 1 else grid_to_graph(t, h, w)
    children, n_components, n_leaves, _ = ward_tree(x, connectivity=connectivity)
    if n_components != 1 or n_leaves != n:  # a grid is connected; guard the contiguity guarantee anyway
        raise RuntimeError(f"Ward tree over a {(t, h, w)} grid had {n_components} components / {n_leaves} leaves.")
    info.setdefault("feature_dim", int(np.shape(features)[1]) if np.ndim(features) == 2 else None)
    return WardTree(np.asarray(children, dtype=np.int64), (t, h, w), info)


def ward_regions(image: ImageTokens, features: torch.Tensor | np.ndarray | WardTree,
                 k: int | None | Sequence[int | None] = None, *, policy: KPolicy | None = None,
                 method: str = "ward", info: dict | None = None, normalize: bool = True,
                 max_dim: int | None = None) -> RegionMap | dict[int, RegionMap]:
    """Ward regions of one image from its (N_tokens, D) token features (or a prebuilt tree).

    ``k`` may be one K (-> a :class:`RegionMap`) or a sequence (-> ``{requested K: RegionMap}``, keyed as requested,
    all cut from one tree). ``None`` uses the K policy.
    """
    tree = features if isinstance(features, WardTree) else build_ward_tree(
        features, image.grid_thw, normalize=normalize, max_dim=max_dim)
    many = isinstance(k, (list, tuple, range))
    ks = list(k) if many else [k]
    resolved = [resolve_k(kk, image.num_tokens, policy) for kk in ks]
    labels = tree.labels_many([r[0] for r in resolved])
    maps = {}
    for kk, (used, kinfo) in zip(ks, resolved):
        maps[kk] = _hard_map(
            image, labels[used], method, {**tree.info, **(info or {}), **kinfo, "clustering": "ward"})
    return maps if many else next(iter(maps.values()))
