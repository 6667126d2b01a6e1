// Shared declarations of the compiled IPCV ops (namespace `ipcv`).
//
// Layering: register.cpp holds the TORCH_LIBRARY schemas and the boundary checks' call sites;
// checks.cpp validates inputs and copies the varlen offsets to the host once per call; the device
// kernels (cpu/kernels.cpp, cuda/kernels.cu) receive validated tensors plus those host offsets and
// never re-check them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ipcv {

// Host copy of validated int32 offsets `cu` ([B + 1], cu[0] == 0, non-decreasing, cu[B] == rows).
using Offsets = std::vector<int64_t>;

using Selection = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // keep, drop, cu_keep, cu_drop
using Plan = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Per-item offsets of the kept and dropped tokens inside `keep` / `drop`, on the host. How many
// tokens an item keeps is not decided here: the caller passes the counts (`keep_counts`, computed
// by the Python op layer with `ipcv_kernels.reference.keep_count`, the rule's only definition).
struct SelectionLayout {
  Offsets cu_keep;
  Offsets cu_drop;
};

// ---- boundary checks (checks.cpp): TORCH_CHECK with messages naming the op and the argument ----
void check_float_matrix(const char* op, const char* name, const at::Tensor& t);
void check_same_float_matrix(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like);
// Validates int32 1-D contiguous offsets on `device` ending at `total`; returns them on the host.
Offsets host_offsets(const char* op, const char* name, const at::Tensor& cu, int64_t total, const at::Device& device);
// Validates int64 1-D `keep_counts` ([B], any device; copied to the host once) against the item
// offsets (0 <= count <= item length) and returns the layout they give.
SelectionLayout selection_layout(const char* op, const Offsets& cu_items, const at::Tensor& keep_counts);
// Validates a CPU int64 1-D index tensor of `length` entries, each in [low, high).
void check_index_rows(const char* op, const char* name, const at::Tensor& index, int64_t length, int64_t low,
                      int64_t high);
// Validates that the (checked, CPU) rows `keep` and `drop` together name each of `rows` rows once.
void check_partition(const char* op, const at::Tensor& keep, const at::Tensor& drop, int64_t rows);

// ---- CPU kernels (cpu/kernels.cpp) ----
namespace cpu {
at::Tensor knn(const at::Tensor& query, const at::Tensor& ref, int64_t k, const Offsets& cu_query,
               const Offsets& cu_ref);
at::Tensor ngr_reconstruct(const at::Tensor& base_drop, const at::Tensor& kept, const at::Tensor& base_kept,
                           const at::Tensor& neighbors);
// Writes out[keep] = kept and out[drop] = the NGR reconstruction; indices int64 and in range.
void ngr_restore(at::Tensor& out, const at::Tensor& kept, const at::Tensor& base_drop, const at::Tensor& base_kept,
                 const at::Tensor& keep, const at::Tensor& drop, const at::Tensor& neighbors);
Selection select_tokens(const at::Tensor& scores, const Offsets& cu_items, const SelectionLayout& layout);
Plan plan(const at::Tensor& x_before, const at::Tensor& x_after, const Offsets& cu_items, const Offsets& cu_seqlens,
          const SelectionLayout& layout, int64_t num_neighbors);
}  // namespace cpu

// ---- CUDA kernels (cuda/kernels.cu), compiled only in CUDA builds (IPCV_WITH_CUDA) ----
namespace cuda {
at::Tensor knn(const at::Tensor& query, const at::Tensor& ref, int64_t k, const Offsets& cu_query,
               const Offsets& cu_ref);
at::Tensor ngr_reconstruct(const at::Tensor& base_drop, const at::Tensor& kept, const at::Tensor& base_kept,
                           const at::Tensor& neighbors);
Selection select_tokens(const at::Tensor& scores, const Offsets& cu_items, const SelectionLayout& layout);
Plan plan(const at::Tensor& x_before, const at::Tensor& x_after, const Offsets& cu_items, const Offsets& cu_seqlens,
          const SelectionLayout& layout, int64_t num_neighbors);
}  // namespace cuda

}  // namespace ipcv
