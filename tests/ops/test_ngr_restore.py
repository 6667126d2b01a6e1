"""``ngr_restore``: the full sequence from kept rows and NGR reconstructions, written in place, with
the next block's LayerNorm optionally fused; every backend (``conftest.BACKENDS``) against the fp64
reference, and the public op's input checks."""

from __future__ import annotations

import pytest
import torch
from conftest import on_cuda, skip_unsupported

import ipcv_kernels as ik
from ipcv_kernels.reference import ngr_restore_reference
from ipcv_kernels.testing import assert_close_to_reference

OP = "ngr_restore"


def restore_case(n, num_kept, dim, k, dtype, device, seed=0):
    """Inputs of one restore: a random keep / drop partition of ``n`` rows, neighbours with ``-1``s."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n, generator=generator)[:num_kept].sort().values
    is_drop = torch.ones(n, dtype=torch.bool)
    is_drop[keep] = False
    drop = is_drop.nonzero().squeeze(1)
    base = torch.randn(n, dim, generator=generator)
    kept = base[keep] + 0.3 * torch.randn(num_kept, dim, generator=generator)
    neighbors = torch.randint(-1, max(num_kept, 1), (n - num_kept, k), generator=generator)
    if n > num_kept:
        neighbors[0] = -1  # a row without any valid neighbour comes out as its base
    tensors = dict(kept=kept, base_drop=base[drop], base_kept=base[keep], keep=keep, drop=drop, neighbors=neighbors)
    return {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()}


def layer_norm(dim, dtype, device, *, affine=True, seed=1):
    norm = torch.nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
    if affine:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=generator))
            norm.bias.copy_(torch.randn(dim, generator=generator))
    return norm.to(device=device, dtype=dtype)


def restored(case, n, dtype, device, norm, backend):
    """``(out, normed)`` of the public op; both buffers start as NaN so unwritten rows show."""
    out = torch.full((n, case["kept"].shape[1]), float("nan"), dtype=dtype, device=device)
    normed = torch.full_like(out, float("nan")) if norm is not None else None
    ik.ngr_restore(out, **case, norm=norm, normed_out=normed, backend=backend)
    return out, normed


def reference_outputs(case, n, dtype, norm):
    """``ngr_restore_reference`` in ``dtype`` and in fp64 (on the same values)."""
    outputs = {}
    for ref_dtype in (dtype, torch.float64):
        ref_case = {k: v.to(ref_dtype) if v.is_floating_point() else v for k, v in case.items()}
        out = torch.empty(n, case["kept"].shape[1], dtype=ref_dtype, device=case["kept"].device)
        normed = torch.empty_like(out) if norm is not None else None
        weight = None if norm is None or norm.weight is None else norm.weight.to(ref_dtype)
        bias = None if norm is None or norm.bias is None else norm.bias.to(ref_dtype)
        args = [ref_case[name] for name in ("kept", "base_drop", "base_kept", "keep", "drop", "neighbors")]
        ngr_restore_reference(out, *args, weight, bias, 1e-6, normed)
        outputs[ref_dtype] = (out, normed)
    return outputs[dtype], outputs[torch.float64]


def check_backend(backend, device, dtype, fuse_norm, affine=True):
    n, num_kept, dim = 37, 13, 80
    case = restore_case(n, num_kept, dim, 3, dtype, device)
    norm = layer_norm(dim, dtype, device, affine=affine) if fuse_norm else None
    out, normed = restored(case, n, dtype, device, norm, backend)
    (same_out, same_normed), (out64, _) = reference_outputs(case, n, dtype, norm)
    assert torch.equal(out[case["keep"]], case["kept"])  # kept rows are copies
    assert_close_to_reference(out, out64, same_out)
    if fuse_norm:
        # Both sides normalise the rows as stored in ``dtype`` (the unfused path's ``norm1(full)``).
        torch_norm = torch.nn.functional.layer_norm(
            out.double(),
            (dim,),
            None if norm.weight is None else norm.weight.double(),
            None if norm.bias is None else norm.bias.double(),
            1e-6,
        )
        assert_close_to_reference(normed, torch_norm, same_normed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fuse_norm", [False, True])
def test_matches_reference(backend, dtype, fuse_norm):
    skip_unsupported(backend, dtype)
    check_backend(backend.name, backend.device, dtype, fuse_norm)


def test_norm_without_affine_parameters(backend):
    check_backend(backend.name, backend.device, torch.float32, True, affine=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_qwen2_vl_width(backend, dtype):
    device = on_cuda(backend)
    case = restore_case(4096, 1434, 1280, 10, dtype, device)
    norm = layer_norm(1280, dtype, device)
    out, normed = restored(case, 4096, dtype, device, norm, backend.name)
    (same_out, same_normed), (out64, _) = reference_outputs(case, 4096, dtype, norm)
    assert_close_to_reference(out, out64, same_out)
    expected_norm = torch.nn.functional.layer_norm(
        out.double(), (1280,), norm.weight.double(), norm.bias.double(), 1e-6
    )
    assert_close_to_reference(normed, expected_norm, same_normed)


def test_empty_sides(backend):
    # Every row kept (no reconstruction), and every row dropped (neighbours over no kept rows).
    for num_kept in (9, 0):
        case = restore_case(9, num_kept, 8, 2, torch.float32, backend.device)
        if num_kept == 0:
            case["neighbors"].fill_(-1)
        out, _ = restored(case, 9, torch.float32, backend.device, None, backend.name)
        expected = torch.empty_like(out)
        expected[case["keep"]] = case["kept"]
        expected[case["drop"]] = case["base_drop"]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_int32_rows_and_a_strided_out(backend):
    # The plan gives int64 rows and the engine a contiguous ``out``; the op also takes int32 rows and
    # an ``out`` with a unit stride on its last dim only (compiled backends may take another path).
    case = restore_case(21, 8, 16, 3, torch.float32, backend.device)
    expected = torch.empty(21, 16, device=backend.device)
    ngr_restore_reference(expected, *case.values())
    narrow = {name: t.int() if not t.is_floating_point() else t for name, t in case.items()}
    storage = torch.full((21, 24), float("nan"), device=backend.device)
    out = storage[:, 4:20]
    ik.ngr_restore(out, **narrow, backend=backend.name)
    torch.testing.assert_close(out, expected)  # fp32 rounding: backends sum the neighbours in their own order
    assert storage[:, :4].isnan().all() and storage[:, 20:].isnan().all()  # nothing written outside ``out``


def test_checks_name_the_argument():
    case = restore_case(10, 4, 8, 2, torch.float32, "cpu")
    out = torch.empty(10, 8)

    def call(**changes):
        args = {"out": out, **case, **changes}
        ik.ngr_restore(**args)

    with pytest.raises(ValueError, match="out must have a unit stride"):
        call(out=torch.empty(8, 10).T)
    with pytest.raises(TypeError, match="base_drop must have the dtype of out"):
        call(base_drop=case["base_drop"].double())
    with pytest.raises(TypeError, match="kept must have the dtype of base_drop"):
        call(kept=case["kept"].double())
    with pytest.raises(ValueError, match="keep must have 4 entries"):
        call(keep=case["keep"][:3])
    with pytest.raises(ValueError, match="every row of out"):
        call(keep=case["keep"].flip(0).clone().fill_(0))
    with pytest.raises(ValueError, match="every row of out"):
        call(out=torch.empty(11, 8))
    with pytest.raises(TypeError, match="drop must have dtype"):
        call(drop=case["drop"].float())
    with pytest.raises(ValueError, match=r"neighbors must be in \[-1, 4\)"):
        call(neighbors=case["neighbors"].clone().fill_(4))
    with pytest.raises(ValueError, match="norm and normed_out must be given together"):
        call(norm=torch.nn.LayerNorm(8))
    with pytest.raises(TypeError, match=r"norm must be an nn\.LayerNorm over the last dim"):
        call(norm=torch.nn.LayerNorm(4), normed_out=torch.empty(10, 8))
    with pytest.raises(ValueError, match="normed_out must be"):
        call(norm=torch.nn.LayerNorm(8), normed_out=torch.empty(9, 8))
