"""``ngr_attention`` backends from attention libraries.

- ``"sdpa"``: one ``torch.nn.functional.scaled_dot_product_attention`` call per segment, CPU and CUDA.
- ``"flash_attn"``: flash-attn 2's ``flash_attn_varlen_func`` (fp16/bf16), when the package is installed.
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash kernel,
  fp16/bf16), when this PyTorch has it.

The last two run on CUDA only. Both take separate query / key offsets, so they compute exactly the op (kept queries over full
keys). Their kernels take fp16/bf16 with head dims up to ``MAX_HEAD_DIM`` (256); other inputs (fp32, fp64, wider heads)
run the per-segment ``sdpa`` backend instead, so that ``auto`` never fails where a backend can run.
Neither library is imported until a call: importing flash-attn loads its CUDA extension.
Both need the longest segment lengths on the host: one small device-to-host copy per call.

None of them fuses ``ngr_attention``'s rotary or query gather: the op layer does those with
PyTorch before calling them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .dispatch import ALL_DEVICES, Backend, register_backend
from .ngr_attention import MAX_HEAD_DIM

HALF_DTYPES = (torch.float16, torch.bfloat16)


def ngr_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` call per segment. q ``[Nq, H, Dh]``, k/v ``[Nkv, H, Dh]``
    float, cu_seqlens_q/k int32 ``[B + 1]``; returns contiguous ``[Nq, H, Dh]`` in q's dtype.

    PyTorch picks a fused (flash / memory-efficient) kernel per segment, so memory stays linear
    in tokens on both CPU and CUDA; the Python loop over segments is the cost.
    """
    # Contiguous whatever q's strides: the layout the op's fake describes.
    out = q.new_zeros(q.shape)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        seg = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None],
            k[k0:k1].transpose(0, 1)[None],
            v[k0:k1].transpose(0, 1)[None],
            scale=softmax_scale,
        )
        out[q0:q1] = seg[0].transpose(0, 1)
    return out


def flash_attn_unavailable() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
    return None


def torch_varlen_unavailable() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def _library_kernels_take(q: torch.Tensor) -> bool:
    return q.dtype in HALF_DTYPES and q.shape[-1] <= MAX_HEAD_DIM


def _dense(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The library kernels assume packed [n, H, Dh] rows; views (k / v split from a fused
    # projection) are copied once here. A no-op for contiguous inputs.
    return tuple(t.contiguous() for t in tensors)


def varlen_library_backend(kernel: Callable[..., torch.Tensor], description: str) -> Callable[..., torch.Tensor]:
    """An ``ngr_attention`` backend from a library's varlen kernel
    ``kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)``.

    The backend takes q ``[Nq, H, Dh]``, k/v ``[Nkv, H, Dh]`` on CUDA and cu_seqlens_q/k int32
    ``[B + 1]``, and returns ``[Nq, H, Dh]``; inputs the library kernels do not take (not
    fp16/bf16, or ``Dh > 256``) run ``sdpa`` instead.
    """

    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        if not _library_kernels_take(q):
            return ngr_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
        q, k, v = _dense(q, k, v)
        longest_q, longest_k = _longest(cu_seqlens_q), _longest(cu_seqlens_k)
        return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, longest_q, longest_k, softmax_scale=softmax_scale)

    attention.__doc__ = f"{description}, non-causal; shapes, dtypes and fallback as ``varlen_library_backend``."
    return attention


def _flash_attn_varlen(*args: object, softmax_scale: float | None = None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(*args, dropout_p=0.0, softmax_scale=softmax_scale, causal=False)


def _torch_varlen(*args: object, softmax_scale: float | None = None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*args, scale=softmax_scale)


ngr_attention_flash_attn = varlen_library_backend(_flash_attn_varlen, "flash-attn 2's ``flash_attn_varlen_func``")
ngr_attention_torch_varlen = varlen_library_backend(_torch_varlen, "``torch.nn.attention.varlen.varlen_attn``")


register_backend("ngr_attention", Backend("sdpa", ngr_attention_sdpa, ALL_DEVICES))
register_backend(
    "ngr_attention",
    Backend("flash_attn", ngr_attention_flash_attn, ("cuda",), is_available=flash_attn_unavailable),
)
register_backend(
    "ngr_attention",
    Backend("torch_varlen", ngr_attention_torch_varlen, ("cuda",), is_available=torch_varlen_unavailable),
)
