// Bindings: the `torch.ops.ipcv.*` schemas and their CPU (and, in CUDA builds, CUDA) kernels.
//
// Every registered function checks its inputs (checks.cpp), copies the offsets to the host once and
// hands validated tensors to the device kernels. The ops are inference-only: no autograd kernel is
// registered, and the Python side registers fake (meta) implementations for torch.compile.
#include <ATen/ops/layer_norm.h>
#include <torch/library.h>

#include "ipcv.h"

namespace ipcv {
namespace {

struct CpuKernels {
  static constexpr auto knn = &cpu::knn;
  static constexpr auto ngr_reconstruct = &cpu::ngr_reconstruct;
  static constexpr auto select_tokens = &cpu::select_tokens;
  static constexpr auto plan = &cpu::plan;
};

#ifdef IPCV_WITH_CUDA
struct CudaKernels {
  static constexpr auto knn = &cuda::knn;
  static constexpr auto ngr_reconstruct = &cuda::ngr_reconstruct;
  static constexpr auto select_tokens = &cuda::select_tokens;
  static constexpr auto plan = &cuda::plan;
};
#endif

template <typename Kernels>
at::Tensor knn(const at::Tensor& query, const at::Tensor& ref, int64_t k, const std::optional<at::Tensor>& cu_query,
               const std::optional<at::Tensor>& cu_ref) {
  constexpr const char* op = "ipcv::knn";
  check_float_matrix(op, "query", query);
  check_same_float_matrix(op, "ref", ref, "query", query);
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  TORCH_CHECK(cu_query.has_value() == cu_ref.has_value(), op, ": cu_query and cu_ref must be given together");
  Offsets query_offsets{0, query.size(0)}, ref_offsets{0, ref.size(0)};
  if (cu_query.has_value()) {
    query_offsets = host_offsets(op, "cu_query", *cu_query, query.size(0), query.device());
    ref_offsets = host_offsets(op, "cu_ref", *cu_ref, ref.size(0), query.device());
    TORCH_CHECK(query_offsets.size() == ref_offsets.size(), op, ": cu_query and cu_ref must have the same length, got ",
                query_offsets.size(), " and ", ref_offsets.size());
  }
  return Kernels::knn(query, ref, k, query_offsets, ref_offsets);
}

template <typename Kernels>
at::Tensor ngr_reconstruct(const at::Tensor& base_drop, const at::Tensor& kept, const at::Tensor& base_kept,
                           const at::Tensor& neighbors) {
  constexpr const char* op = "ipcv::ngr_reconstruct";
  check_float_matrix(op, "base_drop", base_drop);
  check_same_float_matrix(op, "kept", kept, "base_drop", base_drop);
  check_same_float_matrix(op, "base_kept", base_kept, "base_drop", base_drop);
  TORCH_CHECK(base_kept.sizes() == kept.sizes(), op, ": base_kept must have the shape of kept ", kept.sizes(), ", got ",
              base_kept.sizes());
  TORCH_CHECK(neighbors.dim() == 2 && neighbors.size(0) == base_drop.size(0), op, ": neighbors must be [",
              base_drop.size(0), ", k], got ", neighbors.sizes());
  TORCH_CHECK(neighbors.scalar_type() == at::kInt || neighbors.scalar_type() == at::kLong, op,
              ": neighbors must be int32 or int64, got ", neighbors.scalar_type());
  TORCH_CHECK(neighbors.device() == base_drop.device(), op, ": neighbors must be on ", base_drop.device(), ", got ",
              neighbors.device());
  if (neighbors.numel() > 0) {
    // Out-of-range rows would be read out of bounds by the kernel: one min/max reduction guards it.
    const int64_t low = neighbors.min().item<int64_t>(), high = neighbors.max().item<int64_t>();
    TORCH_CHECK(low >= -1 && high < kept.size(0), op, ": neighbors must be in [-1, ", kept.size(0),
                ") (rows of kept, -1 = none), got values in [", low, ", ", high, "]");
  }
  return Kernels::ngr_reconstruct(base_drop, kept, base_kept, neighbors);
}

// CPU only: on CUDA the Python ``cpp`` backend composes the scatters with the compiled reconstruction.
void ngr_restore_cpu(at::Tensor& out, const at::Tensor& kept, const at::Tensor& base_drop, const at::Tensor& base_kept,
                     const at::Tensor& keep, const at::Tensor& drop, const at::Tensor& neighbors,
                     const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                     double norm_eps, const std::optional<at::Tensor>& normed_out) {
  constexpr const char* op = "ipcv::ngr_restore";
  check_float_matrix(op, "out", out);
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (it is written in place)");
  check_same_float_matrix(op, "kept", kept, "out", out);
  check_same_float_matrix(op, "base_drop", base_drop, "out", out);
  check_same_float_matrix(op, "base_kept", base_kept, "out", out);
  TORCH_CHECK(base_kept.sizes() == kept.sizes(), op, ": base_kept must have the shape of kept ", kept.sizes(), ", got ",
              base_kept.sizes());
  const int64_t rows = out.size(0), num_kept = kept.size(0), num_dropped = base_drop.size(0);
  check_index_rows(op, "keep", keep, num_kept, 0, rows);
  check_index_rows(op, "drop", drop, num_dropped, 0, rows);
  TORCH_CHECK(num_kept + num_dropped == rows, op, ": keep and drop must cover out's ", rows, " rows, got ", num_kept,
              " + ", num_dropped);
  check_partition(op, keep, drop, rows);
  TORCH_CHECK(neighbors.dim() == 2 && neighbors.size(0) == num_dropped, op, ": neighbors must be [", num_dropped,
              ", k], got ", neighbors.sizes());
  check_index_rows(op, "neighbors", neighbors.reshape(-1), neighbors.numel(), -1, num_kept);
  TORCH_CHECK(normed_out.has_value() || !(norm_weight.has_value() || norm_bias.has_value()), op,
              ": norm_weight / norm_bias need normed_out");
  cpu::ngr_restore(out, kept, base_drop, base_kept, keep, drop, neighbors);
  if (normed_out.has_value()) {
    TORCH_CHECK(normed_out->sizes() == out.sizes() && normed_out->scalar_type() == out.scalar_type(), op,
                ": normed_out must be like out ", out.sizes(), ", got ", normed_out->sizes());
    normed_out->copy_(at::layer_norm(out, {out.size(1)}, norm_weight, norm_bias, norm_eps));
  }
}

template <typename Kernels>
Selection select_tokens(const at::Tensor& scores, const at::Tensor& cu_items, const at::Tensor& keep_counts) {
  constexpr const char* op = "ipcv::select_tokens";
  TORCH_CHECK(scores.dim() == 1 && at::isFloatingType(scores.scalar_type()), op,
              ": scores must be a 1-D floating tensor, got ", scores.scalar_type(), " of shape ", scores.sizes());
  const Offsets items = host_offsets(op, "cu_items", cu_items, scores.size(0), scores.device());
  return Kernels::select_tokens(scores, items, selection_layout(op, items, keep_counts));
}

template <typename Kernels>
Plan plan(const at::Tensor& x_before, const at::Tensor& x_after, const at::Tensor& cu_items,
          const at::Tensor& cu_seqlens, const at::Tensor& keep_counts, int64_t num_neighbors) {
  constexpr const char* op = "ipcv::plan";
  check_float_matrix(op, "x_after", x_after);
  check_same_float_matrix(op, "x_before", x_before, "x_after", x_after);
  TORCH_CHECK(x_before.size(0) == x_after.size(0), op, ": x_before must have the shape of x_after ", x_after.sizes(),
              ", got ", x_before.sizes());
  TORCH_CHECK(num_neighbors >= 1, op, ": num_neighbors must be >= 1, got ", num_neighbors);
  const Offsets items = host_offsets(op, "cu_items", cu_items, x_after.size(0), x_after.device());
  const Offsets segments = host_offsets(op, "cu_seqlens", cu_seqlens, x_after.size(0), x_after.device());
  return Kernels::plan(x_before, x_after, items, segments, selection_layout(op, items, keep_counts), num_neighbors);
}

}  // namespace

TORCH_LIBRARY(ipcv, m) {
  m.def("knn(Tensor query, Tensor ref, int k, Tensor? cu_query=None, Tensor? cu_ref=None) -> Tensor");
  m.def("ngr_reconstruct(Tensor base_drop, Tensor kept, Tensor base_kept, Tensor neighbors) -> Tensor");
  m.def(
      "ngr_restore(Tensor(a!) out, Tensor kept, Tensor base_drop, Tensor base_kept, Tensor keep, Tensor drop, Tensor "
      "neighbors, Tensor? norm_weight, Tensor? norm_bias, float norm_eps, Tensor(b!)? normed_out) -> ()");
  // keep_counts: int64 [B], the tokens each item keeps (Python's keep_count rule, applied once there).
  m.def("select_tokens(Tensor scores, Tensor cu_items, Tensor keep_counts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "plan(Tensor x_before, Tensor x_after, Tensor cu_items, Tensor cu_seqlens, Tensor keep_counts, int "
      "num_neighbors) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ipcv, CPU, m) {
  m.impl("knn", &knn<CpuKernels>);
  m.impl("ngr_reconstruct", &ngr_reconstruct<CpuKernels>);
  m.impl("ngr_restore", &ngr_restore_cpu);
  m.impl("select_tokens", &select_tokens<CpuKernels>);
  m.impl("plan", &plan<CpuKernels>);
}

#ifdef IPCV_WITH_CUDA
TORCH_LIBRARY_IMPL(ipcv, CUDA, m) {
  m.impl("knn", &knn<CudaKernels>);
  m.impl("ngr_reconstruct", &ngr_reconstruct<CudaKernels>);
  m.impl("select_tokens", &select_tokens<CudaKernels>);
  m.impl("plan", &plan<CudaKernels>);
}
#endif

}  // namespace ipcv
