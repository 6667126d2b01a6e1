// Input checks at the boundary of the compiled ops. The Python public API validates too; these
// checks make direct `torch.ops.ipcv.*` calls fail with a clear message instead of reading out of
// bounds inside a kernel.
#include <c10/util/Exception.h>

#include <vector>

#include "ipcv.h"

namespace ipcv {

void check_float_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, D], got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be fp16/bf16/fp32/fp64, got ",
              t.scalar_type());
}

void check_same_float_matrix(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  check_float_matrix(op, name, t);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " like ", like_name, ", got ",
              t.device());
  TORCH_CHECK(t.size(1) == like.size(1), op, ": ", name, " must have ", like.size(1), " columns like ", like_name,
              ", got ", t.size(1));
}

Offsets host_offsets(const char* op, const char* name, const at::Tensor& cu, int64_t total, const at::Device& device) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, op, ": ", name,
              " must be 1-D offsets with at least 2 entries, got shape ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == device, op, ": ", name, " must be on ", device, ", got ", cu.device());
  // One small device-to-host copy per call: output sizes depend on the offsets' values.
  const at::Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* data = host.data_ptr<int32_t>();
  Offsets offsets(data, data + host.numel());
  TORCH_CHECK(offsets.front() == 0, op, ": ", name, " must start at 0, got ", offsets.front());
  TORCH_CHECK(offsets.back() == total, op, ": ", name, " must end at the number of rows (", total, "), got ",
              offsets.back());
  for (size_t i = 1; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= offsets[i - 1], op, ": ", name, " must be non-decreasing, but entry ", i, " (",
                offsets[i], ") < entry ", i - 1, " (", offsets[i - 1], ")");
  }
  return offsets;
}

SelectionLayout selection_layout(const char* op, const Offsets& cu_items, const at::Tensor& keep_counts) {
  const int64_t num_items = static_cast<int64_t>(cu_items.size()) - 1;
  TORCH_CHECK(keep_counts.dim() == 1 && keep_counts.size(0) == num_items, op,
              ": keep_counts must be 1-D with one count per item (", num_items, "), got shape ", keep_counts.sizes());
  TORCH_CHECK(keep_counts.scalar_type() == at::kLong, op, ": keep_counts must be int64, got ",
              keep_counts.scalar_type());
  // The Python op layer passes a CPU tensor: then this is no copy.
  const at::Tensor host = keep_counts.to(at::kCPU).contiguous();
  const int64_t* counts = host.const_data_ptr<int64_t>();
  SelectionLayout layout{Offsets{0}, Offsets{0}};
  for (int64_t b = 0; b < num_items; ++b) {
    const int64_t n = cu_items[b + 1] - cu_items[b];
    // Only the bounds that keep the kernels' writes in range: the count rule itself is Python's.
    TORCH_CHECK(counts[b] >= 0 && counts[b] <= n, op, ": keep_counts must be in [0, item length], but item ", b,
                " has ", n, " tokens and count ", counts[b]);
    layout.cu_keep.push_back(layout.cu_keep.back() + counts[b]);
    layout.cu_drop.push_back(layout.cu_drop.back() + (n - counts[b]));
  }
  return layout;
}

void check_index_rows(const char* op, const char* name, const at::Tensor& index, int64_t length, int64_t low,
                      int64_t high) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == length, op, ": ", name, " must be 1-D with ", length,
              " entries, got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", index.device());
  const at::Tensor rows = index.contiguous();
  const int64_t* data = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < length; ++i) {
    TORCH_CHECK(data[i] >= low && data[i] < high, op, ": ", name, " must be in [", low, ", ", high, "), but entry ", i,
                " is ", data[i]);
  }
}

void check_partition(const char* op, const at::Tensor& keep, const at::Tensor& drop, int64_t rows) {
  std::vector<bool> seen(rows, false);
  for (const at::Tensor& index : {keep.contiguous(), drop.contiguous()}) {
    const int64_t* data = index.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < index.numel(); ++i) {
      TORCH_CHECK(!seen[data[i]], op, ": keep and drop must name every row once, but row ", data[i], " appears twice");
      seen[data[i]] = true;
    }
  }
}

}  // namespace ipcv
