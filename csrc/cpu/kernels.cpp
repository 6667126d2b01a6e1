// CPU kernels of the IPCV planning step, k-nearest-neighbour search, NGR reconstruction and restore.
//
// Parallelism is OpenMP (the runtime torch itself uses), with at most at::get_num_threads() threads.
// Work is split into independent units (an item, or a tile of one item's query rows) scheduled
// dynamically, so a batch of many small images costs one parallel region instead of one Python
// loop iteration and a dozen tensor ops per image. Each unit calls single-threaded BLAS (a GEMM
// inside an OpenMP region does not spawn nested threads).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../ipcv.h"

namespace ipcv::cpu {
namespace {

// Query rows per kNN work unit and reference rows per GEMM: [256, D] x [D, 512] blocks keep BLAS
// efficient (an image's dropped tokens are often one unit: no small GEMMs), the distance block
// (512 KiB) stays in L2, and a large item still splits into enough units for every thread.
// (Measured on the 2-core benchmark box: 64 x 1024 and 128 x 1024 were 3-8% slower.)
constexpr int64_t kQueryTile = 256;
constexpr int64_t kRefTile = 512;
// The planning step makes one work unit per item (instead of per query tile) when a batch has at
// least this many items per thread: enough for dynamic scheduling to balance uneven items.
constexpr int64_t kItemsPerThreadForItemUnits = 4;

// Runs body(state, i) for i in [0, count) on OpenMP threads with dynamic scheduling (units differ in
// size: items have different lengths). Each thread makes its scratch `state` once with make_state(),
// so units reuse buffers instead of allocating (large blocks are mmap'd and page-faulted afresh on
// every allocation). The first exception thrown by a unit is rethrown after the loop.
template <typename MakeState, typename Body>
void parallel_units(int64_t count, const MakeState& make_state, const Body& body) {
  std::exception_ptr error;
  std::mutex error_mutex;
  const auto record = [&] {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!error) error = std::current_exception();
  };
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count)));
  if (threads == 1) {
    // One unit of work: run it on the calling thread. A one-thread OpenMP region would make the
    // unit's GEMM a nested parallel call, which on libgomp costs milliseconds per call.
    auto state = make_state();
    for (int64_t i = 0; i < count; ++i) body(state, i);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    try {
      auto state = make_state();
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < count; ++i) {
        try {
          body(state, i);
        } catch (...) {
          record();
        }
      }
    } catch (...) {
      record();
    }
  }
  if (error) std::rethrow_exception(error);
}

// sum_c (a[c] - b[c])^2 (b == nullptr: sum_c a[c]^2) in acc_t. kLanes independent partial sums
// break the loop-carried dependency, so the compiler vectorises the body and keeps several vector
// accumulators in flight (strict FP order would forbid both for a single running sum).
template <typename scalar_t, typename acc_t>
acc_t squared_norm(const scalar_t* a, const scalar_t* b, int64_t dim) {
  constexpr int64_t kLanes = 16;
  acc_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= dim; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t diff = static_cast<acc_t>(a[c + l]) - (b ? static_cast<acc_t>(b[c + l]) : acc_t(0));
      partial[l] += diff * diff;
    }
  }
  acc_t sum = 0;
  for (; c < dim; ++c) {
    const acc_t diff = static_cast<acc_t>(a[c]) - (b ? static_cast<acc_t>(b[c]) : acc_t(0));
    sum += diff * diff;
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

// Copies `count` rows of `src` ([*, dim], row-major) into `dst` converting to acc_t; row i is
// src row rows[i] (or first + i when rows is null).
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* src, int64_t dim, const int64_t* rows, int64_t first, int64_t count, acc_t* dst) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = src + (rows ? rows[first + i] : first + i) * dim;
    acc_t* out = dst + i * dim;
    for (int64_t c = 0; c < dim; ++c) out[c] = static_cast<acc_t>(row[c]);
  }
}

// All rows of `src` (optionally picked by `rows`) as a contiguous acc_t matrix plus their squared norms.
template <typename scalar_t, typename acc_t>
std::pair<at::Tensor, at::Tensor> reference_rows(const at::Tensor& src, const int64_t* rows, int64_t count) {
  const int64_t dim = src.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  // Rows already contiguous in the accumulation type are used in place (no copy of the references).
  constexpr bool in_place_possible = std::is_same_v<scalar_t, acc_t>;
  const bool in_place = in_place_possible && rows == nullptr;
  at::Tensor matrix = in_place ? src : at::empty({count, dim}, src.options().dtype(acc_type));
  at::Tensor sq_norms = at::empty({count}, src.options().dtype(acc_type));
  const scalar_t* src_data = src.const_data_ptr<scalar_t>();
  acc_t* norms = sq_norms.mutable_data_ptr<acc_t>();
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    if (!in_place) gather_rows(src_data, dim, rows, begin, end - begin, matrix.mutable_data_ptr<acc_t>() + begin * dim);
    const acc_t* out = matrix.const_data_ptr<acc_t>();
    for (int64_t i = begin; i < end; ++i) norms[i] = squared_norm<acc_t, acc_t>(out + i * dim, nullptr, dim);
  });
  return {matrix, sq_norms};
}

// An upper bound on the kk-th smallest of keys[0..cols): split the keys into groups, take each
// group's minimum; kk of these minima are kk distinct keys, so the kk-th smallest minimum bounds the
// kk-th smallest key from above and every key of the top kk is <= it. About 2 kk groups make the
// bound tight (a few keys above the true kk-th pass it). Returns +inf (no filtering) for short rows.
// `minima` needs room for 4 * kk + 1 values.
template <typename acc_t>
acc_t kth_smallest_bound(const acc_t* keys, int64_t cols, int64_t kk, acc_t* minima) {
  if (cols < 4 * kk) return std::numeric_limits<acc_t>::infinity();
  const int64_t group = cols / (2 * kk);  // >= 2, so at most 4 kk full groups
  int64_t groups = 0;
  for (int64_t j0 = 0; j0 + group <= cols; j0 += group) {
    acc_t low = std::numeric_limits<acc_t>::infinity();
    for (int64_t j = j0; j < j0 + group; ++j) low = keys[j] < low ? keys[j] : low;  // skips NaN
    minima[groups++] = low;
  }
  std::nth_element(minima, minima + kk - 1, minima + groups);
  return minima[kk - 1];
}

// One unit of work: query rows [q_begin, q_end) of segment `segment`.
struct QueryTile {
  int64_t segment;
  int64_t q_begin;
  int64_t q_end;
};

std::vector<QueryTile> query_tiles(const Offsets& cu_query, const Offsets& cu_ref) {
  std::vector<QueryTile> tiles;
  for (size_t b = 0; b + 1 < cu_query.size(); ++b) {
    if (cu_ref[b + 1] == cu_ref[b]) continue;  // no reference rows: the output rows stay -1
    for (int64_t q = cu_query[b]; q < cu_query[b + 1]; q += kQueryTile) {
      tiles.push_back({static_cast<int64_t>(b), q, std::min(q + kQueryTile, cu_query[b + 1])});
    }
  }
  return tiles;
}

// Per-thread scratch of the kNN search: a query tile, a distance block and one tile's top-k lists.
template <typename acc_t>
struct KnnScratch {
  at::Tensor queries, dots;
  std::vector<acc_t> best_key, minima;
  std::vector<int64_t> best_index;

  KnnScratch(int64_t dim, int64_t k, const at::TensorOptions& options)
      : queries(at::empty({kQueryTile, dim}, options)),
        dots(at::empty({kQueryTile * kRefTile}, options)),
        best_key(kQueryTile * k),
        minima(4 * k + 4),
        best_index(kQueryTile * k) {}
};

// k nearest of `queries` ([rows, D], rows <= kQueryTile) among `refs` ([ref_count, D]) with squared
// norms `ref_norms`; writes out[i * k + j] = ref_index_base + (j-th nearest), j < min(k, ref_count).
//
// dist(q, r)^2 = |q|^2 + |r|^2 - 2 q.r. |q|^2 is the same for all candidates of a query row, so rows
// are ranked by key = |r|^2 - 2 q.r, whose q.r part for a [query tile x ref block] comes from one
// GEMM. Each query row keeps a sorted list of its k best keys; a candidate costs one compare unless it
// beats the current k-th best. Memory: one query tile, one distance block and the lists per thread,
// never the whole |query| x |ref| matrix of a segment.
template <typename acc_t>
void search_tile(const at::Tensor& queries, const at::Tensor& refs, const acc_t* ref_norms, int64_t ref_index_base,
                 int64_t k, KnnScratch<acc_t>& scratch, int64_t* out) {
  const int64_t rows = queries.size(0), ref_count = refs.size(0);
  const int64_t kk = std::min(k, ref_count);
  if (kk == 0) return;
  acc_t* best_key = scratch.best_key.data();
  int64_t* best_index = scratch.best_index.data();
  std::fill_n(best_key, rows * kk, std::numeric_limits<acc_t>::infinity());
  std::fill_n(best_index, rows * kk, int64_t{-1});
  for (int64_t r0 = 0; r0 < ref_count; r0 += kRefTile) {
    const int64_t cols = std::min(kRefTile, ref_count - r0);
    at::Tensor dots = scratch.dots.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(dots, queries, refs.narrow(0, r0, cols).t());
    acc_t* dot = dots.mutable_data_ptr<acc_t>();
    const acc_t* norms = ref_norms + r0;
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* keys = best_key + i * kk;
      int64_t* index = best_index + i * kk;
      acc_t* row = dot + i * cols;
      for (int64_t j = 0; j < cols; ++j) row[j] = norms[j] - 2 * row[j];  // keys, in place (vectorised)
      acc_t worst = keys[kk - 1];
      // While the list is still empty, almost every key would be inserted; a bound on the block's
      // kk-th smallest key filters them first.
      const acc_t bound = worst == std::numeric_limits<acc_t>::infinity()
                              ? kth_smallest_bound(row, cols, kk, scratch.minima.data())
                              : std::numeric_limits<acc_t>::infinity();
      // After the first few keys almost every test fails: a well-predicted branch per key.
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t key = row[j];
        if (!(key < worst && key <= bound)) continue;  // also rejects NaN
        int64_t slot = kk - 1;
        for (; slot > 0 && keys[slot - 1] > key; --slot) {
          keys[slot] = keys[slot - 1];
          index[slot] = index[slot - 1];
        }
        keys[slot] = key;
        index[slot] = ref_index_base + r0 + j;
        worst = keys[kk - 1];
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) std::copy_n(best_index + i * kk, kk, out + i * k);
}

// Streaming k-nearest search, segment by segment, one work unit per query tile. Query row q is
// query_src row query_rows[q] (or q when query_rows is null); `ref_rows` holds every reference row in
// the accumulation type. Writes out[q, :min(k, |ref segment|)].
template <typename scalar_t>
void knn_segments(const scalar_t* query_src, const int64_t* query_rows, int64_t dim, const at::Tensor& ref_rows,
                  const at::Tensor& ref_sq_norms, const Offsets& cu_query, const Offsets& cu_ref, int64_t k,
                  int64_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<QueryTile> tiles = query_tiles(cu_query, cu_ref);
  const acc_t* sq_norms = ref_sq_norms.const_data_ptr<acc_t>();
  const auto make_scratch = [&] { return KnnScratch<acc_t>(dim, k, ref_rows.options()); };
  parallel_units(static_cast<int64_t>(tiles.size()), make_scratch, [&](KnnScratch<acc_t>& scratch, int64_t unit) {
    const QueryTile& tile = tiles[unit];
    const int64_t rows = tile.q_end - tile.q_begin;
    const int64_t ref_first = cu_ref[tile.segment];
    const int64_t ref_count = cu_ref[tile.segment + 1] - ref_first;
    at::Tensor queries;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (query_rows == nullptr) {  // contiguous rows of the right type: a view, no copy
        queries = at::from_blob(const_cast<acc_t*>(query_src) + tile.q_begin * dim, {rows, dim}, ref_rows.options());
      }
    }
    if (!queries.defined()) {
      queries = scratch.queries.narrow(0, 0, rows);
      gather_rows(query_src, dim, query_rows, tile.q_begin, rows, queries.mutable_data_ptr<acc_t>());
    }
    search_tile(queries, ref_rows.narrow(0, ref_first, ref_count), sq_norms + ref_first, ref_first, k, scratch,
                out + tile.q_begin * k);
  });
}

// Keeps the `count` highest scores of positions [begin, begin + n) (item_scores[i]: position
// begin + i) and writes the kept and dropped
// positions in ascending order. NaN ranks as the largest score (as torch.topk does); ties go to the
// lower position, so the result is deterministic.
template <typename score_t>
void select_item(const score_t* item_scores, int64_t begin, int64_t n, int64_t count, int64_t* keep, int64_t* drop) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  const auto key = [&](int64_t i) {
    const score_t s = item_scores[i];
    return std::isnan(s) ? std::numeric_limits<score_t>::infinity() : s;
  };
  if (count < n) {
    std::nth_element(order.begin(), order.begin() + count, order.end(), [&](int64_t a, int64_t b) {
      const score_t ka = key(a), kb = key(b);
      return ka > kb || (ka == kb && a < b);
    });
  }
  std::vector<char> kept(n, 0);
  for (int64_t i = 0; i < count; ++i) kept[order[i]] = 1;
  for (int64_t p = 0; p < n; ++p) {
    if (kept[p]) {
      *keep++ = begin + p;
    } else {
      *drop++ = begin + p;
    }
  }
}

at::Tensor offsets_tensor(const Offsets& offsets) {
  at::Tensor out = at::empty({static_cast<int64_t>(offsets.size())}, at::TensorOptions().dtype(at::kInt));
  std::copy(offsets.begin(), offsets.end(), out.mutable_data_ptr<int32_t>());
  return out;
}

template <typename score_t>
Selection select_from_scores(const score_t* scores, const Offsets& cu_items, const SelectionLayout& layout,
                             const at::TensorOptions& options) {
  at::Tensor keep = at::empty({layout.cu_keep.back()}, options.dtype(at::kLong));
  at::Tensor drop = at::empty({layout.cu_drop.back()}, options.dtype(at::kLong));
  int64_t* keep_data = keep.mutable_data_ptr<int64_t>();
  int64_t* drop_data = drop.mutable_data_ptr<int64_t>();
  const auto no_scratch = [] { return 0; };
  parallel_units(static_cast<int64_t>(cu_items.size()) - 1, no_scratch, [&](int, int64_t b) {
    const int64_t n = cu_items[b + 1] - cu_items[b];
    select_item(scores + cu_items[b], cu_items[b], n, layout.cu_keep[b + 1] - layout.cu_keep[b],
                keep_data + layout.cu_keep[b], drop_data + layout.cu_drop[b]);
  });
  return {keep, drop, offsets_tensor(layout.cu_keep), offsets_tensor(layout.cu_drop)};
}

// score[j] = || x_after[j] - x_before[j] ||_2, accumulated in acc_t: one pass over both inputs with no
// [n, D] temporary (the reference materialises the difference in fp32).
template <typename scalar_t>
at::Tensor token_scores(const at::Tensor& x_before, const at::Tensor& x_after) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x_after.size(0), dim = x_after.size(1);
  at::Tensor scores = at::empty({n}, x_after.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* before = x_before.const_data_ptr<scalar_t>();
  const scalar_t* after = x_after.const_data_ptr<scalar_t>();
  acc_t* out = scores.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      out[j] = std::sqrt(squared_norm<scalar_t, acc_t>(after + j * dim, before + j * dim, dim));
    }
  });
  return scores;
}

// The planning step with one work unit per item: a unit scores, selects and searches its own item
// while the item's rows are still in cache, and gathers its kept rows into per-thread scratch, so
// there is no batch-wide gather pass. Used when a batch has enough items to load every thread; a
// few large items (a video) take the per-tile path instead. Writes keep, drop and neighbors ([Nd, k],
// prefilled with -1) at the offsets of `layout`.
template <typename scalar_t>
void plan_per_item(const at::Tensor& before, const at::Tensor& base, const Offsets& cu_items,
                   const SelectionLayout& layout, int64_t k, int64_t* keep, int64_t* drop, int64_t* neighbors) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = base.size(1);
  const at::TensorOptions options = base.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* after_data = base.const_data_ptr<scalar_t>();
  const scalar_t* before_data = before.const_data_ptr<scalar_t>();
  struct ItemScratch {
    KnnScratch<acc_t> knn;
    at::Tensor refs;
    std::vector<acc_t> scores, ref_norms;
  };
  const auto make_scratch = [&] { return ItemScratch{KnnScratch<acc_t>(dim, k, options), at::Tensor(), {}, {}}; };
  parallel_units(static_cast<int64_t>(cu_items.size()) - 1, make_scratch, [&](ItemScratch& scratch, int64_t b) {
    const int64_t begin = cu_items[b], n = cu_items[b + 1] - begin;
    const int64_t kept = layout.cu_keep[b + 1] - layout.cu_keep[b], dropped = n - kept;
    int64_t* item_keep = keep + layout.cu_keep[b];
    int64_t* item_drop = drop + layout.cu_drop[b];
    scratch.scores.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = (begin + j) * dim;
      scratch.scores[j] = std::sqrt(squared_norm<scalar_t, acc_t>(after_data + row, before_data + row, dim));
    }
    select_item(scratch.scores.data(), begin, n, kept, item_keep, item_drop);
    if (kept == 0 || dropped == 0) return;

    if (!scratch.refs.defined() || scratch.refs.size(0) < kept) scratch.refs = at::empty({kept, dim}, options);
    const at::Tensor refs = scratch.refs.narrow(0, 0, kept);
    acc_t* ref_data = refs.mutable_data_ptr<acc_t>();
    gather_rows(after_data, dim, item_keep, 0, kept, ref_data);
    scratch.ref_norms.resize(kept);
    for (int64_t i = 0; i < kept; ++i)
      scratch.ref_norms[i] = squared_norm<acc_t, acc_t>(ref_data + i * dim, nullptr, dim);

    for (int64_t q0 = 0; q0 < dropped; q0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, dropped - q0);
      const at::Tensor queries = scratch.knn.queries.narrow(0, 0, rows);
      gather_rows(after_data, dim, item_drop, q0, rows, queries.mutable_data_ptr<acc_t>());
      search_tile(queries, refs, scratch.ref_norms.data(), layout.cu_keep[b], k, scratch.knn,
                  neighbors + (layout.cu_drop[b] + q0) * k);
    }
  });
}

}  // namespace

at::Tensor knn(const at::Tensor& query, const at::Tensor& ref, int64_t k, const Offsets& cu_query,
               const Offsets& cu_ref) {
  const at::Tensor q = query.contiguous(), r = ref.contiguous();
  at::Tensor out = at::full({q.size(0), k}, -1, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ipcv_knn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [ref_rows, ref_sq_norms] = reference_rows<scalar_t, acc_t>(r, nullptr, r.size(0));
    knn_segments<scalar_t>(q.const_data_ptr<scalar_t>(), nullptr, q.size(1), ref_rows, ref_sq_norms, cu_query, cu_ref,
                           k, out.mutable_data_ptr<int64_t>());
  });
  return out;
}

at::Tensor ngr_reconstruct(const at::Tensor& base_drop, const at::Tensor& kept, const at::Tensor& base_kept,
                           const at::Tensor& neighbors) {
  const at::Tensor drop_rows = base_drop.contiguous(), kept_rows = kept.contiguous(),
                   base_rows = base_kept.contiguous(), index = neighbors.contiguous();
  at::Tensor out = at::empty_like(drop_rows);
  const int64_t rows = drop_rows.size(0), dim = drop_rows.size(1), k = index.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, drop_rows.scalar_type(), "ipcv_ngr_reconstruct_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "ipcv_ngr_reconstruct_cpu_index", [&] {
      const scalar_t* base = drop_rows.const_data_ptr<scalar_t>();
      const scalar_t* now = kept_rows.const_data_ptr<scalar_t>();
      const scalar_t* then = base_rows.const_data_ptr<scalar_t>();
      const index_t* nbr = index.const_data_ptr<index_t>();
      scalar_t* result = out.mutable_data_ptr<scalar_t>();
      // recon[d] = base_drop[d] + (1 / #valid) * sum_{valid j} (kept - base_kept)[nbr[d, j]], in acc_t.
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> delta(dim);
        for (int64_t d = begin; d < end; ++d) {
          std::fill(delta.begin(), delta.end(), acc_t(0));
          int64_t valid = 0;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t m = static_cast<int64_t>(nbr[d * k + j]);
            if (m < 0) continue;
            ++valid;
            for (int64_t c = 0; c < dim; ++c) {
              delta[c] += static_cast<acc_t>(now[m * dim + c]) - static_cast<acc_t>(then[m * dim + c]);
            }
          }
          const acc_t scale = valid ? acc_t(1) / static_cast<acc_t>(valid) : acc_t(0);
          for (int64_t c = 0; c < dim; ++c) {
            result[d * dim + c] = static_cast<scalar_t>(static_cast<acc_t>(base[d * dim + c]) + delta[c] * scale);
          }
        }
      });
    });
  });
  return out;
}

void ngr_restore(at::Tensor& out, const at::Tensor& kept, const at::Tensor& base_drop, const at::Tensor& base_kept,
                 const at::Tensor& keep, const at::Tensor& drop, const at::Tensor& neighbors) {
  const at::Tensor kept_rows = kept.contiguous(), drop_rows = base_drop.contiguous(),
                   base_rows = base_kept.contiguous(), keep_index = keep.contiguous(), drop_index = drop.contiguous(),
                   nbr_index = neighbors.contiguous();
  const int64_t num_kept = kept_rows.size(0), num_dropped = drop_rows.size(0), dim = out.size(1), k = nbr_index.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ipcv_ngr_restore_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* now = kept_rows.const_data_ptr<scalar_t>();
    const scalar_t* then = base_rows.const_data_ptr<scalar_t>();
    const scalar_t* base = drop_rows.const_data_ptr<scalar_t>();
    const int64_t* keep_row = keep_index.const_data_ptr<int64_t>();
    const int64_t* drop_row = drop_index.const_data_ptr<int64_t>();
    const int64_t* nbr = nbr_index.const_data_ptr<int64_t>();
    scalar_t* full = out.mutable_data_ptr<scalar_t>();
    // One pass over the output rows, unit u < num_kept the kept row u, else dropped row u - num_kept:
    //   out[keep[i]] = kept[i]
    //   out[drop[d]] = base_drop[d] + (1 / #valid) * sum_{valid j} (kept - base_kept)[nbr[d, j]]  (in acc_t)
    // instead of two scatters around a reconstruction into a temporary (three ops, three passes).
    at::parallel_for(0, num_kept + num_dropped, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> delta(dim);
      for (int64_t u = begin; u < end; ++u) {
        if (u < num_kept) {
          std::copy_n(now + u * dim, dim, full + keep_row[u] * dim);
          continue;
        }
        const int64_t d = u - num_kept;
        std::fill(delta.begin(), delta.end(), acc_t(0));
        int64_t valid = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t m = nbr[d * k + j];
          if (m < 0) continue;
          ++valid;
          for (int64_t c = 0; c < dim; ++c) {
            delta[c] += static_cast<acc_t>(now[m * dim + c]) - static_cast<acc_t>(then[m * dim + c]);
          }
        }
        const acc_t scale = valid ? acc_t(1) / static_cast<acc_t>(valid) : acc_t(0);
        scalar_t* row = full + drop_row[d] * dim;
        for (int64_t c = 0; c < dim; ++c) {
          row[c] = static_cast<scalar_t>(static_cast<acc_t>(base[d * dim + c]) + delta[c] * scale);
        }
      }
    });
  });
}

Selection select_tokens(const at::Tensor& scores, const Offsets& cu_items, const SelectionLayout& layout) {
  const at::Tensor s = scores.contiguous();
  Selection result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ipcv_select_tokens_cpu", [&] {
    // fp16/bf16 scores are exact in fp32, so ranking the widened copy changes nothing.
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor wide = s.to(c10::CppTypeToScalarType<acc_t>::value);
    result = select_from_scores(wide.const_data_ptr<acc_t>(), cu_items, layout, s.options());
  });
  return result;
}

Plan plan(const at::Tensor& x_before, const at::Tensor& x_after, const Offsets& cu_items, const Offsets& cu_seqlens,
          const SelectionLayout& layout, int64_t num_neighbors) {
  const at::Tensor before = x_before.contiguous(), base = x_after.contiguous();
  Plan result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "ipcv_plan_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor keep, drop, cu_keep, cu_drop, neighbors;
    const int64_t num_items = static_cast<int64_t>(cu_items.size()) - 1;
    if (num_items >= kItemsPerThreadForItemUnits * at::get_num_threads()) {
      keep = at::empty({layout.cu_keep.back()}, base.options().dtype(at::kLong));
      drop = at::empty({layout.cu_drop.back()}, base.options().dtype(at::kLong));
      neighbors = at::full({drop.size(0), num_neighbors}, -1, base.options().dtype(at::kLong));
      plan_per_item<scalar_t>(before, base, cu_items, layout, num_neighbors, keep.mutable_data_ptr<int64_t>(),
                              drop.mutable_data_ptr<int64_t>(), neighbors.mutable_data_ptr<int64_t>());
      cu_keep = offsets_tensor(layout.cu_keep);
      cu_drop = offsets_tensor(layout.cu_drop);
    } else {
      const at::Tensor scores = token_scores<scalar_t>(before, base);
      std::tie(keep, drop, cu_keep, cu_drop) =
          select_from_scores(scores.const_data_ptr<acc_t>(), cu_items, layout, base.options());
      const Offsets keep_offsets(cu_keep.const_data_ptr<int32_t>(),
                                 cu_keep.const_data_ptr<int32_t>() + cu_keep.numel());
      const Offsets drop_offsets(cu_drop.const_data_ptr<int32_t>(),
                                 cu_drop.const_data_ptr<int32_t>() + cu_drop.numel());
      // Neighbours of every dropped token among its item's kept tokens, on base = x_after.
      neighbors = at::full({drop.size(0), num_neighbors}, -1, base.options().dtype(at::kLong));
      const auto [ref_rows, ref_sq_norms] =
          reference_rows<scalar_t, acc_t>(base, keep.const_data_ptr<int64_t>(), keep.size(0));
      knn_segments<scalar_t>(base.const_data_ptr<scalar_t>(), drop.const_data_ptr<int64_t>(), base.size(1), ref_rows,
                             ref_sq_norms, drop_offsets, keep_offsets, num_neighbors,
                             neighbors.mutable_data_ptr<int64_t>());
    }
    const int64_t* keep_data = keep.const_data_ptr<int64_t>();

    // Kept tokens before each segment boundary: a binary search in the ascending `keep`.
    Offsets kept_segments(cu_seqlens.size());
    for (size_t s = 0; s < cu_seqlens.size(); ++s) {
      kept_segments[s] = std::lower_bound(keep_data, keep_data + keep.size(0), cu_seqlens[s]) - keep_data;
    }
    result = {keep, drop, cu_keep, cu_drop, neighbors, offsets_tensor(kept_segments)};
  });
  return result;
}

}  // namespace ipcv::cpu
