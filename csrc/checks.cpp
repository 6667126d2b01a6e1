// Input checks at the boundary of the compiled ops. The Python public API validates too; these
// checks make direct `torch.ops.ipcv.*` calls fail with a clear message instead of reading out of
// bounds inside a kernel.
#include <c10/util/Exception.h>

#include "ipcv.h"

namespace ipcv {

SelectionLayout selection_layout(const Offsets& cu_items, double ratio) {
  SelectionLayout layout{Offsets{0}, Offsets{0}};
  for (size_t b = 0; b + 1 < cu_items.size(); ++b) {
    const int64_t n = cu_items[b + 1] - cu_items[b];
    const int64_t kept = keep_count(n, ratio);
    layout.cu_keep.push_back(layout.cu_keep.back() + kept);
    layout.cu_drop.push_back(layout.cu_drop.back() + (n - kept));
  }
  return layout;
}

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

void check_ratio(const char* op, double ratio) {
  TORCH_CHECK(ratio >= 0.0 && ratio < 1.0, op, ": ratio must be in [0, 1), got ", ratio);
}

}  // namespace ipcv
