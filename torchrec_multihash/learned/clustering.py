"""Balanced clustering of id vectors into rows, for millions of ids and rows on CPU.

A balanced variant of k-means' partitioning: recursive bisection (as a k-d tree), each cell split
at the weighted median of its widest dimension, so that ``k`` cells come out with about equal
weight (access frequency): similar ids share a row, and no row carries much more traffic than
another. All cells of one level are split at once with a few sorts, ``O(n log n log k)``; Lloyd's
k-means would cost ``O(n k)`` per iteration, out of reach with millions of rows.
"""

import torch


def balanced_clusters(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster index in [0, k) of each row of ``x`` ([n, d]), cells of about equal ``weight``.

    Every cluster gets at least one point when ``n >= k``.
    """
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    x = x.float()  # coordinates in float32 (memory); weights and their sums in float64 (precision)
    w = weight.double().clamp(min=1e-12)
    seg = torch.zeros(n, dtype=torch.long)  # the cell of each point
    cell_k = torch.tensor([k], dtype=torch.long)  # clusters each cell must still produce
    while bool((cell_k > 1).any()):
        cells = cell_k.numel()
        total = torch.zeros(cells, dtype=torch.float64).index_add_(0, seg, w)
        wf = w.float()[:, None]
        mean = torch.zeros(cells, x.shape[1]).index_add_(0, seg, x * wf)
        mean /= total.float().clamp(min=1e-12)[:, None]
        var = torch.zeros_like(mean).index_add_(0, seg, (x - mean[seg]) ** 2 * wf)
        value = x.gather(1, var.argmax(1)[seg][:, None]).squeeze(1)
        # order points by (cell, value along the cell's widest dimension)
        order = torch.argsort(value, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        s_seg, s_w = seg[order], w[order]
        count = torch.bincount(seg, minlength=cells)
        first = torch.cumsum(count, 0) - count  # index of each cell's first point in the order
        rank = torch.arange(n) - first[s_seg]
        before = torch.cumsum(s_w, 0) - s_w
        before = before - before[first[s_seg].clamp(max=n - 1)]  # weight before the point in its cell
        left_k = cell_k // 2
        left_k = torch.where(cell_k == 1, cell_k, left_k)  # a finished cell stays whole, on the left
        frac = left_k.double() / cell_k.clamp(min=1).double()
        goes_left = before < frac[s_seg] * total[s_seg]
        n_left = torch.zeros(cells, dtype=torch.long).index_add_(0, s_seg, goes_left.long())
        # each side keeps at least as many points as it must make clusters, where possible
        right_k = cell_k - left_k
        lo = torch.minimum(left_k, count)
        hi = torch.clamp(count - right_k, min=lo)
        n_left = torch.maximum(torch.minimum(n_left, hi), lo)
        side = (rank >= n_left[s_seg]).long()
        new_seg = torch.empty_like(seg)
        new_seg[order] = 2 * s_seg + side
        seg = new_seg
        cell_k = torch.stack([left_k, right_k], 1).reshape(-1)
    # cells that made a cluster are numbered in order; empty ones (n < k) are skipped
    used = torch.unique(seg)
    return torch.searchsorted(used, seg)
