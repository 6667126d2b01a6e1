// CUDA kernels of the IPCV planning step, k-nearest-neighbour search and NGR reconstruction.
//
// Same contract as cpu/kernels.cpp. Distances come from cuBLAS GEMMs on [query tile x ref tile]
// blocks; a warp per query row merges each block into the row's running top-k list, held one slot
// per lane (k <= 32), so memory stays linear in tokens (times the tile size). All launches go on the
// current stream; the only host synchronisation of a call is the copy of the offsets (done by the
// boundary checks), needed because output sizes depend on them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/topk.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../ipcv.h"

namespace ipcv::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The warp-held top-k list has one slot per lane; larger k takes the ATen topk merge.
constexpr int64_t kMaxWarpK = kWarp;
constexpr int kWarpsPerBlock = 8;
// Rows of one distance block: a [kTile x kTile] fp32 block is 64 MiB, bounded whatever n is.
constexpr int64_t kTile = 4096;

int64_t blocks_for(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

// Offsets (host) as an int64 tensor on `device`: one small host-to-device copy.
at::Tensor device_offsets(const Offsets& offsets, const at::Device& device, at::ScalarType dtype) {
  at::Tensor host = at::empty({static_cast<int64_t>(offsets.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(offsets.begin(), offsets.end(), host.mutable_data_ptr<int64_t>());
  return host.to(device).to(dtype);
}

// score[j] = || after[j] - before[j] ||_2 in acc_t; one warp per row, lanes stride over D.
template <typename scalar_t, typename acc_t>
__global__ void token_scores_kernel(const scalar_t* before, const scalar_t* after, int64_t rows, int64_t dim,
                                    acc_t* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // uniform per warp
  acc_t sum = 0;
  for (int64_t c = lane; c < dim; c += kWarp) {
    const acc_t diff = static_cast<acc_t>(after[row * dim + c]) - static_cast<acc_t>(before[row * dim + c]);
    sum += diff * diff;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(kFullMask, sum, offset);
  if (lane == 0) out[row] = sqrt(sum);
}

template <typename acc_t>
__device__ acc_t rank_key(acc_t score) {
  // NaN ranks as the largest score, as torch.topk does.
  return isnan(score) ? static_cast<acc_t>(INFINITY) : score;
}

// kept[j] = (rank of j in its item < keep count), rank = #{i in item: key_i > key_j, or equal with
// i < j}. Exact and deterministic (ties go to the lower position), O(n_b) reads per token with an
// early exit once the rank reaches the count; memory O(n).
template <typename acc_t>
__global__ void rank_select_kernel(const acc_t* scores, const int64_t* cu_items, int64_t num_items,
                                   const int64_t* keep_counts, int64_t n, bool* kept) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  int64_t lo = 0, hi = num_items;  // item b with cu_items[b] <= j < cu_items[b + 1]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_items[mid] <= j) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t count = keep_counts[lo];
  const acc_t key = rank_key(scores[j]);
  int64_t rank = 0;
  for (int64_t i = cu_items[lo]; i < cu_items[lo + 1] && rank < count; ++i) {
    const acc_t other = rank_key(scores[i]);
    rank += (other > key) || (other == key && i < j);
  }
  kept[j] = rank < count;
}

// keep/drop positions in ascending order from the mask and its inclusive prefix sum.
__global__ void scatter_positions_kernel(const bool* kept, const int64_t* kept_prefix, int64_t n, int64_t* keep,
                                         int64_t* drop) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t kept_before = kept_prefix[j] - kept[j];
  if (kept[j]) {
    keep[kept_before] = j;
  } else {
    drop[j - kept_before] = j;
  }
}

// Merges one [rows x cols] block of dot products into each row's sorted top-k list (k <= 32).
//
// key(q, r) = |r|^2 - 2 q.r ranks candidates like |q - r|^2 (|q|^2 is constant per row). Lane l holds
// the l-th best (key, index) of its warp's row. Each step, the 32 lanes take 32 columns, a ballot marks
// the ones beating the current k-th best, and each such candidate is inserted at position
// p = #{slots <= key} by shifting slots p.. up one lane (__shfl_up_sync).
template <typename acc_t>
__global__ void merge_topk_kernel(const acc_t* dots, int64_t rows, int64_t cols, const acc_t* ref_sq_norms,
                                  int64_t first_index, int k, acc_t* best_key, int64_t* best_index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // uniform per warp
  acc_t slot_key = lane < k ? best_key[row * k + lane] : static_cast<acc_t>(INFINITY);
  int64_t slot_index = lane < k ? best_index[row * k + lane] : -1;
  acc_t worst = __shfl_sync(kFullMask, slot_key, k - 1);
  for (int64_t c0 = 0; c0 < cols; c0 += kWarp) {
    const int64_t c = c0 + lane;
    const acc_t key = c < cols ? ref_sq_norms[c] - 2 * dots[row * cols + c] : static_cast<acc_t>(INFINITY);
    unsigned candidates = __ballot_sync(kFullMask, key < worst);
    while (candidates != 0) {
      const int source = __ffs(candidates) - 1;
      candidates &= candidates - 1;
      const acc_t candidate = __shfl_sync(kFullMask, key, source);
      if (!(candidate < worst)) continue;  // the list improved since the ballot (warp-uniform test)
      const int position = __popc(__ballot_sync(kFullMask, lane < k && slot_key <= candidate));
      const acc_t lower_key = __shfl_up_sync(kFullMask, slot_key, 1);
      const int64_t lower_index = __shfl_up_sync(kFullMask, slot_index, 1);
      if (lane > position) {
        slot_key = lower_key;
        slot_index = lower_index;
      } else if (lane == position) {
        slot_key = candidate;
        slot_index = first_index + c0 + source;
      }
      worst = __shfl_sync(kFullMask, slot_key, k - 1);
    }
  }
  if (lane < k) {
    best_key[row * k + lane] = slot_key;
    best_index[row * k + lane] = slot_index;
  }
}

template <typename scalar_t, typename index_t, typename acc_t>
__global__ void reconstruct_kernel(const scalar_t* base_drop, const scalar_t* kept, const scalar_t* base_kept,
                                   const index_t* neighbors, int64_t dim, int64_t k, scalar_t* out) {
  // recon[d] = base_drop[d] + (1 / #valid) * sum_{valid j} (kept - base_kept)[neighbors[d, j]]; block d.
  const int64_t d = blockIdx.x;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    acc_t sum = 0;
    int64_t valid = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t m = static_cast<int64_t>(neighbors[d * k + j]);
      if (m < 0) continue;
      ++valid;
      sum += static_cast<acc_t>(kept[m * dim + c]) - static_cast<acc_t>(base_kept[m * dim + c]);
    }
    const acc_t mean = valid ? sum / static_cast<acc_t>(valid) : acc_t(0);
    out[d * dim + c] = static_cast<scalar_t>(static_cast<acc_t>(base_drop[d * dim + c]) + mean);
  }
}

// Streaming k-nearest search. `queries(b, begin, count)` returns the acc-typed query rows
// [begin, begin + count) of the query array; `ref_rows` holds every reference row in the acc type.
template <typename acc_t, typename QueryRows>
void knn_segments(const QueryRows& queries, const at::Tensor& ref_rows, const Offsets& cu_query, const Offsets& cu_ref,
                  int64_t k, at::Tensor& out) {
  const at::Tensor ref_sq_norms = ref_rows.mul(ref_rows).sum(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t b = 0; b + 1 < cu_query.size(); ++b) {
    const int64_t ref_first = cu_ref[b], ref_count = cu_ref[b + 1] - cu_ref[b];
    const int64_t kk = std::min(k, ref_count);
    if (kk == 0) continue;
    for (int64_t q0 = cu_query[b]; q0 < cu_query[b + 1]; q0 += kTile) {
      const int64_t rows = std::min(kTile, cu_query[b + 1] - q0);
      const at::Tensor q = queries(q0, rows);
      at::Tensor best_key = at::full({rows, kk}, std::numeric_limits<acc_t>::infinity(), ref_rows.options());
      at::Tensor best_index = at::full({rows, kk}, -1, ref_rows.options().dtype(at::kLong));
      for (int64_t r0 = 0; r0 < ref_count; r0 += kTile) {
        const int64_t cols = std::min(kTile, ref_count - r0);
        const at::Tensor dots = at::mm(q, ref_rows.narrow(0, ref_first + r0, cols).t()).contiguous();
        const at::Tensor norms = ref_sq_norms.narrow(0, ref_first + r0, cols);
        if (kk <= kMaxWarpK) {
          merge_topk_kernel<acc_t><<<blocks_for(rows, kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, stream>>>(
              dots.const_data_ptr<acc_t>(), rows, cols, norms.const_data_ptr<acc_t>(), ref_first + r0,
              static_cast<int>(kk), best_key.mutable_data_ptr<acc_t>(), best_index.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          // Large k: merge with ATen's topk over [current list | block] (still one block at a time).
          const at::Tensor keys = at::cat({best_key, norms.unsqueeze(0).sub(dots.mul(2))}, 1);
          const at::Tensor columns =
              at::cat({best_index, at::arange(ref_first + r0, ref_first + r0 + cols, best_index.options())
                                       .unsqueeze(0)
                                       .expand({rows, cols})},
                      1);
          const auto [top_keys, top_slots] = at::topk(keys, kk, 1, /*largest=*/false, /*sorted=*/true);
          best_key = top_keys;
          best_index = columns.gather(1, top_slots);
        }
      }
      out.narrow(0, q0, rows).narrow(1, 0, kk).copy_(best_index);
    }
  }
}

at::ScalarType acc_type_of(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

// Selection from acc-typed scores (fp32/fp64) on the device.
Selection select_from_scores(const at::Tensor& scores, const Offsets& cu_items, const SelectionLayout& layout) {
  const int64_t n = scores.size(0);
  Offsets counts(cu_items.size() - 1);
  for (size_t b = 0; b + 1 < cu_items.size(); ++b) counts[b] = layout.cu_keep[b + 1] - layout.cu_keep[b];
  const at::Device device = scores.device();
  const at::Tensor items = device_offsets(cu_items, device, at::kLong);
  const at::Tensor keep_counts = device_offsets(counts, device, at::kLong);
  at::Tensor kept = at::empty({n}, scores.options().dtype(at::kBool));
  at::Tensor keep = at::empty({layout.cu_keep.back()}, scores.options().dtype(at::kLong));
  at::Tensor drop = at::empty({layout.cu_drop.back()}, scores.options().dtype(at::kLong));
  if (n > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int threads = 256;
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "ipcv_rank_select_cuda", [&] {
      rank_select_kernel<scalar_t><<<blocks_for(n, threads), threads, 0, stream>>>(
          scores.const_data_ptr<scalar_t>(), items.const_data_ptr<int64_t>(), static_cast<int64_t>(counts.size()),
          keep_counts.const_data_ptr<int64_t>(), n, kept.mutable_data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor prefix = at::cumsum(kept, 0, at::kLong);
    scatter_positions_kernel<<<blocks_for(n, threads), threads, 0, stream>>>(
        kept.const_data_ptr<bool>(), prefix.const_data_ptr<int64_t>(), n, keep.mutable_data_ptr<int64_t>(),
        drop.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {keep, drop, device_offsets(layout.cu_keep, device, at::kInt),
          device_offsets(layout.cu_drop, device, at::kInt)};
}

}  // namespace

at::Tensor knn(const at::Tensor& query, const at::Tensor& ref, int64_t k, const Offsets& cu_query,
               const Offsets& cu_ref) {
  const c10::cuda::CUDAGuard guard(query.device());
  const at::ScalarType acc = acc_type_of(query.scalar_type());
  const at::Tensor q = query.contiguous().to(acc), r = ref.contiguous().to(acc);
  at::Tensor out = at::full({q.size(0), k}, -1, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(acc, "ipcv_knn_cuda", [&] {
    knn_segments<scalar_t>([&](int64_t begin, int64_t count) { return q.narrow(0, begin, count); }, r, cu_query, cu_ref,
                           k, out);
  });
  return out;
}

at::Tensor ngr_reconstruct(const at::Tensor& base_drop, const at::Tensor& kept, const at::Tensor& base_kept,
                           const at::Tensor& neighbors) {
  const c10::cuda::CUDAGuard guard(base_drop.device());
  const at::Tensor drop_rows = base_drop.contiguous(), kept_rows = kept.contiguous(),
                   base_rows = base_kept.contiguous(), index = neighbors.contiguous();
  at::Tensor out = at::empty_like(drop_rows);
  const int64_t rows = drop_rows.size(0), dim = drop_rows.size(1), k = index.size(1);
  if (rows == 0 || dim == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(256, blocks_for(dim, kWarp) * kWarp));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, drop_rows.scalar_type(), "ipcv_ngr_reconstruct_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "ipcv_ngr_reconstruct_cuda_index", [&] {
      reconstruct_kernel<scalar_t, index_t, acc_t>
          <<<rows, threads, 0, stream>>>(drop_rows.const_data_ptr<scalar_t>(), kept_rows.const_data_ptr<scalar_t>(),
                                         base_rows.const_data_ptr<scalar_t>(), index.const_data_ptr<index_t>(), dim, k,
                                         out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

Selection select_tokens(const at::Tensor& scores, const Offsets& cu_items, const SelectionLayout& layout) {
  const c10::cuda::CUDAGuard guard(scores.device());
  // fp16/bf16 scores are exact in fp32, so ranking the widened copy changes nothing.
  return select_from_scores(scores.contiguous().to(acc_type_of(scores.scalar_type())), cu_items, layout);
}

Plan plan(const at::Tensor& x_before, const at::Tensor& x_after, const Offsets& cu_items, const Offsets& cu_seqlens,
          const SelectionLayout& layout, int64_t num_neighbors) {
  const c10::cuda::CUDAGuard guard(x_after.device());
  const at::Tensor before = x_before.contiguous(), base = x_after.contiguous();
  const int64_t n = base.size(0), dim = base.size(1);
  const at::ScalarType acc = acc_type_of(base.scalar_type());
  at::Tensor scores = at::empty({n}, base.options().dtype(acc));
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "ipcv_token_scores_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      token_scores_kernel<scalar_t, acc_t>
          <<<blocks_for(n, kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
              before.const_data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), n, dim,
              scores.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Plain variables, not a structured binding: the lambdas below capture `drop`, which C++17
  // (torch < 2.13 builds extensions as C++17) does not allow for structured bindings.
  at::Tensor keep, drop, cu_keep, cu_drop;
  std::tie(keep, drop, cu_keep, cu_drop) = select_from_scores(scores, cu_items, layout);

  // Neighbours of every dropped token among its item's kept tokens, on base = x_after.
  at::Tensor neighbors = at::full({drop.size(0), num_neighbors}, -1, base.options().dtype(at::kLong));
  const at::Tensor ref_rows = base.index_select(0, keep).to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "ipcv_plan_knn_cuda", [&] {
    knn_segments<scalar_t>(
        [&](int64_t begin, int64_t count) { return base.index_select(0, drop.narrow(0, begin, count)).to(acc); },
        ref_rows, layout.cu_drop, layout.cu_keep, num_neighbors, neighbors);
  });

  // Kept tokens before each segment boundary: a binary search in the ascending `keep`.
  const at::Tensor boundaries = device_offsets(cu_seqlens, base.device(), at::kLong);
  const at::Tensor kept_segments = at::searchsorted(keep, boundaries).to(at::kInt);
  return {keep, drop, cu_keep, cu_drop, neighbors, kept_segments};
}

}  // namespace ipcv::cuda
