"""``ngr_attention`` backends from attention libraries, CUDA only.

- ``"flash_attn"``: flash-attn 2's ``flash_attn_varlen_func`` (fp16/bf16), when the package is installed.
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash kernel,
  fp16/bf16), when this PyTorch has it.

Both take separate query / key offsets, so they compute exactly the op (kept queries over full
keys). Their kernels take fp16/bf16 with head dims up to 256; other inputs (fp32, fp64, wider heads)
run the per-segment ``sdpa`` backend instead, so that ``auto`` never fails where a backend can run.
Neither library is imported until a call: importing flash-attn loads its CUDA extension.
Both need the longest segment lengths on the host: one small device-to-host copy per call.

``unfused_attention_inputs`` prepares ``ngr_attention``'s fused options (rotary, query gather)
with PyTorch for every backend that does not fuse them.
"""

from __future__ import annotations

import importlib.util

import torch

from ..reference.rotary import apply_rotary_vision
from .dispatch import Backend, register_backend
from .torch_backend import ngr_attention_sdpa

# Below Triton (20), above sdpa (10): ``auto`` on CUDA prefers the fused Triton kernel.
FLASH_ATTN_PRIORITY = 15
TORCH_VARLEN_PRIORITY = 12
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


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


def ngr_attention_flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``flash_attn_varlen_func``, non-causal. q ``[Nq, H, Dh]``, k/v ``[Nk, H, Dh]`` on CUDA (fp16/bf16,
    ``Dh <= 256``; otherwise ``sdpa``)."""
    from flash_attn import flash_attn_varlen_func

    if not _library_kernels_take(q):
        return ngr_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
    q, k, v = _dense(q, k, v)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        _longest(cu_seqlens_q),
        _longest(cu_seqlens_k),
        dropout_p=0.0,
        softmax_scale=softmax_scale,
        causal=False,
    )


def ngr_attention_torch_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn``, non-causal. Shapes, dtypes and fallback as ``flash_attn``."""
    from torch.nn.attention.varlen import varlen_attn

    if not _library_kernels_take(q):
        return ngr_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
    q, k, v = _dense(q, k, v)
    return varlen_attn(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        _longest(cu_seqlens_q),
        _longest(cu_seqlens_k),
        scale=softmax_scale,
    )


def unfused_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    q_rows: torch.Tensor | None,
    q_positions: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` gathered at ``q_rows`` and ``q``, ``k`` rotated, by PyTorch: what a backend that does not
    fuse ``ngr_attention``'s ``rotary`` / ``q_rows`` / ``q_positions`` options attends with."""
    positions = q_rows if q_rows is not None else q_positions
    if q_rows is not None:
        q = q[q_rows]
    if rotary is not None:
        cos, sin = rotary
        q_cos, q_sin = (cos, sin) if positions is None else (cos[positions], sin[positions])
        q = apply_rotary_vision(q, q_cos, q_sin)
        k = apply_rotary_vision(k, cos, sin)
    return q, k


register_backend(
    "ngr_attention",
    Backend("flash_attn", ngr_attention_flash_attn, ("cuda",), FLASH_ATTN_PRIORITY, flash_attn_unavailable),
)
register_backend(
    "ngr_attention",
    Backend("torch_varlen", ngr_attention_torch_varlen, ("cuda",), TORCH_VARLEN_PRIORITY, torch_varlen_unavailable),
)
