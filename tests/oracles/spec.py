"""An independent, deliberately naive float64 implementation of the spec (docs/spec.md) on Qwen2-VL.

It shares no code with ``ipcv_kernels``: it reads the tower's weights, recomputes the rotary
tables from ``grid_thw``, and runs every step of the spec with explicit per-item, per-token loops
(distances by direct subtraction, attention per segment by dense softmax). It is the oracle the
integration tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotary_tables(tower, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's 2-D rotary ``cos``/``sin`` ``[n, head_dim]`` in float64, from the spec of the model:
    h and w coordinates of each patch, in the merge-window order the processor packs patches in."""
    cfg = tower.config
    head_dim = cfg.embed_dim // cfg.num_heads
    quarter = head_dim // 2
    theta = (cfg.rope_parameters or {}).get("rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float64) / quarter))
    m = cfg.spatial_merge_size
    rows = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h)[:, None].expand(h, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        wpos = torch.arange(w)[None, :].expand(h, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        rows.append(torch.stack([hpos, wpos], -1).repeat(t, 1))
    pos = torch.cat(rows).to(torch.float64)
    freqs = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], -1)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def _attention(block, x_query_rows, x_all, segments, cos, sin, query_positions, key_positions):
    """Dense per-segment attention output for the query rows. segments: list of (query idx list,
    key idx list) in terms of rows of x_query_rows / x_all."""
    heads = block.attn.num_heads
    width = x_all.shape[1]
    hd = width // heads
    w, b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
    q = (x_query_rows @ w[:width].T + b[:width]).view(-1, heads, hd)
    k = (x_all @ w[width : 2 * width].T + b[width : 2 * width]).view(-1, heads, hd)
    v = (x_all @ w[2 * width :].T + b[2 * width :]).view(-1, heads, hd)
    q = _rotate(q, cos[query_positions], sin[query_positions])
    k = _rotate(k, cos[key_positions], sin[key_positions])
    out = torch.zeros_like(q)
    for qi, ki in segments:
        if not qi or not ki:
            continue
        logits = torch.einsum("qhd,khd->hqk", q[qi], k[ki]) * hd**-0.5
        out[qi] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[ki])
    return F.linear(out.reshape(-1, width), block.attn.proj.weight.double(), block.attn.proj.bias.double())


def _ln(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight.double(), module.bias.double(), module.eps)


def _mlp(block, y):
    return y + block.mlp(_ln(block.norm2, y).to(block.mlp.fc1.weight.dtype)).double()


def _segments_of(grid_thw):
    """Attention segments: one per image / video frame, as lists of token positions."""
    segs, start = [], 0
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            segs.append(list(range(start, start + h * w)))
            start += h * w
    return segs


def ipcv_oracle(tower, pixel_values, grid_thw, *, prune_layer, ratio, as_layers, num_neighbors, scope="image"):
    """``(last_hidden_state, pooler_output)`` of the spec's IPCV forward, in float64."""
    x = tower.patch_embed(pixel_values.to(tower.patch_embed.proj.weight.dtype)).double()
    cos, sin = rotary_tables(tower, grid_thw)
    segments = _segments_of(grid_thw)
    n = x.shape[0]
    everyone = list(range(n))
    depth = len(tower.blocks)
    lengths = [t * h * w for t, h, w in grid_thw.tolist()]
    items, start = [], 0
    for length in lengths if scope == "image" else [n]:
        items.append(list(range(start, start + length)))
        start += length

    def full_block(block, x):
        seg = [(s, s) for s in segments]
        y = x + _attention(block, _ln(block.norm1, x), _ln(block.norm1, x), seg, cos, sin, everyone, everyone)
        return _mlp(block, y)

    # 1. blocks 0 .. P-1 unchanged.
    for i in range(prune_layer):
        x_prev, x = x, full_block(tower.blocks[i], x)
    base = x
    # 2. selection per item.
    keep, drop = [], []
    for item in items:
        scores = {j: float((base[j] - x_prev[j]).norm()) for j in item}
        count = max(1, int(len(item) * (1 - ratio)))
        chosen = sorted(sorted(item, key=lambda j: -scores[j])[:count])
        keep += chosen
        drop += [j for j in item if j not in set(chosen)]
    keep.sort()
    drop.sort()
    row_of_kept = {j: r for r, j in enumerate(keep)}
    # 3. neighbours: nearest kept tokens of the same item, by direct Euclidean distance.
    neighbours = {}
    for item in items:
        kept_here = [j for j in item if j in row_of_kept]
        for d in item:
            if d in row_of_kept:
                continue
            by_distance = sorted(kept_here, key=lambda m: float((base[d] - base[m]).norm()))
            neighbours[d] = by_distance[: min(num_neighbors, len(kept_here))]

    def restore(h):
        full = torch.empty_like(base)
        for j in keep:
            full[j] = h[row_of_kept[j]]
        for d in drop:
            nbrs = neighbours[d]
            delta = sum((h[row_of_kept[m]] - base[m] for m in nbrs), torch.zeros_like(base[d]))
            full[d] = base[d] + (delta / len(nbrs) if nbrs else 0)
        return full

    h = base[keep]
    for i in range(prune_layer, depth):
        block = tower.blocks[i]
        if i < prune_layer + as_layers:  # 5. attention stabilisation
            full = restore(h)
            h = full_block(block, full)[keep]
        else:  # 6. pruned block: segments shrunk to kept tokens
            seg = []
            for s in segments:
                rows = [row_of_kept[j] for j in s if j in row_of_kept]
                seg.append((rows, rows))
            normed = _ln(block.norm1, h)
            y = h + _attention(block, normed, normed, seg, cos, sin, keep, keep)
            h = _mlp(block, y)
    # 7. restoration and merger.
    full = restore(h)
    return full, tower.merger(full.to(tower.merger.mlp[0].weight.dtype))
