"""The ops under ``torch.compile``: the ``torch.ops.ipcv_kernels`` custom ops capture into one graph
(their fake implementations describe every output), and the public ops and a patched tower compile
and equal eager mode. ``aot_eager`` traces exactly as inductor does, without generating code."""

from __future__ import annotations

import torch
from conftest import offsets

import ipcv_kernels as ik
from ipcv_kernels.testing.models import build_qwen2_vl_tower, sample_pixels


def op_inputs():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    keep, drop = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 5])
    base = randn(7, 8)
    return {
        "q": randn(4, 2, 16),
        "k": randn(7, 2, 16),
        "v": randn(7, 2, 16),
        "cu_q": offsets([1, 3]),
        "cu_k": offsets([3, 4]),
        "base_drop": base[drop],
        "base_kept": base[keep],
        "kept": base[keep] + 0.1,
        "keep": keep,
        "drop": drop,
        "cu_items": offsets([3, 4]),
        "x_before": randn(7, 8),
        "x_after": base,
    }


def every_op(q, k, v, cu_q, cu_k, base_drop, base_kept, kept, keep, drop, cu_items, x_before, x_after):
    ops = torch.ops.ipcv_kernels
    neighbors = ops.knn(base_drop, base_kept, 2, None, None, "auto")
    recon = ops.ngr_reconstruct(base_drop, kept, base_kept, neighbors, "auto")
    attention = ops.ngr_attention(q, k, v, cu_q, cu_k, None, None, None, None, None, "auto")
    full = torch.empty_like(x_after)
    ops.ngr_restore(full, kept, base_drop, base_kept, keep, drop, neighbors, None, None, 0.0, None, "auto")
    plan = ops.plan(x_before, x_after, cu_items, cu_items, 0.5, 2, "auto")
    return neighbors, recon, attention, full, *plan


def test_custom_ops_capture_in_one_graph():
    inputs = op_inputs()
    compiled = torch.compile(every_op, backend="aot_eager", fullgraph=True, dynamic=False)
    for got, expected in zip(compiled(**inputs), every_op(**inputs), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_public_ops_compile():
    # The public ops check their inputs on the host (graph breaks), then run the custom ops.
    inputs = op_inputs()

    def public(q, k, v, cu_q, cu_k, base_drop, base_kept, kept, keep, drop, **_):
        neighbors = ik.knn(base_drop, base_kept, 2)
        attention = ik.ngr_attention(q, k, v, cu_q, cu_k)
        full = torch.empty(7, 8)
        ik.ngr_restore(full, kept, base_drop, base_kept, keep, drop, neighbors)
        return neighbors, attention, full

    compiled = torch.compile(public, backend="aot_eager")
    for got, expected in zip(compiled(**inputs), public(**inputs), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_patched_tower_compiles():
    tower = build_qwen2_vl_tower(dtype=torch.float32)
    pixels, grid_thw = sample_pixels(tower.config, [[1, 4, 6], [1, 2, 4]])
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=3))
    try:
        with torch.no_grad():
            expected = tower(pixels, grid_thw=grid_thw).last_hidden_state
            got = torch.compile(tower, backend="aot_eager")(pixels, grid_thw=grid_thw).last_hidden_state
    finally:
        ik.remove_ipcv(tower)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
