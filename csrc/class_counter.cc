#include "class_counter.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "parallel.h"

namespace dnet_fast {

namespace {

constexpr std::size_t kGrain = std::size_t{1} << 18;  // samples per thread before another thread pays off
constexpr int64_t kMaxLaneClasses = 4096;              // above this, 4 histogram lanes cost more than they save

bool outside(int64_t v, int64_t num_classes) { return static_cast<uint64_t>(v) >= static_cast<uint64_t>(num_classes); }

// Counts [begin, end) into `hist`, (total, correct) pairs per class. The hot loop keeps one 64-bit counter per class
// packing total (low 32 bits) and correct (high 32 bits), so a sample costs a single read-modify-write, and spreads
// consecutive samples over four lanes so runs of equal labels (sorted eval sets) do not serialise on one counter.
// Sub-chunks of at most 2^31 samples keep both halves from overflowing.
CountStatus count_chunk(const int64_t* pred, const int64_t* label, std::size_t begin, std::size_t end,
                        int64_t num_classes, int64_t* hist, int64_t lanes) {
  constexpr std::size_t kSubChunk = std::size_t{1} << 31;
  const auto classes = static_cast<std::size_t>(num_classes);
  const std::size_t stride = lanes == 4 ? classes : 0;
  std::vector<uint64_t> packed(static_cast<std::size_t>(lanes) * classes);
  uint64_t* h = packed.data();
  CountStatus status;
  for (std::size_t lo = begin; lo < end && status.kind == CountStatus::kOk; lo += kSubChunk) {
    const std::size_t hi = std::min(end, lo + kSubChunk);
    std::fill(packed.begin(), packed.end(), 0);
    std::size_t i = lo;
    for (; i + 4 <= hi; i += 4) {
      const int64_t y0 = label[i], y1 = label[i + 1], y2 = label[i + 2], y3 = label[i + 3];
      if (outside(y0, num_classes) || outside(y1, num_classes) || outside(y2, num_classes) ||
          outside(y3, num_classes)) {
        break;  // the scalar loop below finds the exact index
      }
      h[static_cast<std::size_t>(y0)] += 1 + (static_cast<uint64_t>(pred[i] == y0) << 32);
      h[stride + static_cast<std::size_t>(y1)] += 1 + (static_cast<uint64_t>(pred[i + 1] == y1) << 32);
      h[2 * stride + static_cast<std::size_t>(y2)] += 1 + (static_cast<uint64_t>(pred[i + 2] == y2) << 32);
      h[3 * stride + static_cast<std::size_t>(y3)] += 1 + (static_cast<uint64_t>(pred[i + 3] == y3) << 32);
    }
    for (; i < hi; ++i) {
      const int64_t y = label[i];
      if (outside(y, num_classes)) {
        status = {CountStatus::kBadLabel, i};
        break;
      }
      h[static_cast<std::size_t>(y)] += 1 + (static_cast<uint64_t>(pred[i] == y) << 32);
    }
    for (std::size_t k = 0; k < packed.size(); ++k) {
      const std::size_t c = k % classes;
      hist[2 * c] += static_cast<int64_t>(packed[k] & 0xFFFFFFFFULL);
      hist[2 * c + 1] += static_cast<int64_t>(packed[k] >> 32);
    }
  }
  return status;
}

// Runs chunk(begin, end, partial) per thread on zeroed partial buffers of `width` values; returns the partials in
// thread order and the status of the earliest failing chunk.
template <typename Chunk>
CountStatus run_partials(std::size_t n, int threads, std::size_t width, std::vector<std::vector<int64_t>>& partials,
                         Chunk&& chunk) {
  partials.assign(static_cast<std::size_t>(threads), std::vector<int64_t>(width, 0));
  std::vector<CountStatus> status(static_cast<std::size_t>(threads));
  parallel_chunks(n, threads, [&](std::size_t t, std::size_t begin, std::size_t end) {
    status[t] = chunk(begin, end, partials[t].data());
  });
  for (const auto& s : status) {
    if (s.kind != CountStatus::kOk) return s;
  }
  return {};
}

// Sums the (total, correct) pairs of every partial into the outputs.
void reduce_pairs(const std::vector<std::vector<int64_t>>& partials, int64_t num_classes, int64_t* correct,
                  int64_t* total) {
  std::fill_n(correct, num_classes, 0);
  std::fill_n(total, num_classes, 0);
  for (const auto& part : partials) {
    for (int64_t c = 0; c < num_classes; ++c) {
      total[c] += part[static_cast<std::size_t>(2 * c)];
      correct[c] += part[static_cast<std::size_t>(2 * c + 1)];
    }
  }
}

// Rank of the label in one row: larger logits anywhere plus equal logits at lower indices. Sets `nan` when the
// row holds a NaN (comparisons with NaN are false, so it must be detected separately).
// Rank of the label in one row: larger logits anywhere plus equal logits at lower indices. Sets `nan` when the
// row holds a NaN (comparisons with NaN are false, so it must be detected separately). 32-bit accumulators let the
// compiler keep four or eight lanes per vector register (rows are shorter than 2^31).
template <typename T>
int64_t label_rank(const T* row, int64_t y, int64_t num_classes, bool& nan) {
  const T zy = row[y];
  int32_t rank = 0, bad = static_cast<int32_t>(zy != zy);
  for (int64_t j = 0; j < y; ++j) {
    rank += static_cast<int32_t>(row[j] >= zy);
    bad |= static_cast<int32_t>(row[j] != row[j]);
  }
  for (int64_t j = y + 1; j < num_classes; ++j) {
    rank += static_cast<int32_t>(row[j] > zy);
    bad |= static_cast<int32_t>(row[j] != row[j]);
  }
  nan = bad != 0;
  return rank;
}

}  // namespace

CountStatus count_per_class(const int64_t* pred, const int64_t* label, std::size_t n, int64_t num_classes,
                            int64_t* correct, int64_t* total, int threads) {
  const int t = choose_threads(n, threads, kGrain);
  const int64_t lanes = num_classes <= kMaxLaneClasses ? 4 : 1;
  std::vector<std::vector<int64_t>> partials;
  const CountStatus status = run_partials(n, t, static_cast<std::size_t>(2 * num_classes), partials,
                                          [&](std::size_t begin, std::size_t end, int64_t* hist) {
                                            return count_chunk(pred, label, begin, end, num_classes, hist, lanes);
                                          });
  if (status.kind == CountStatus::kOk) reduce_pairs(partials, num_classes, correct, total);
  return status;
}

template <typename T>
CountStatus count_from_logits(const T* logits, const int64_t* label, std::size_t n, int64_t num_classes,
                              int64_t topk, int64_t* correct, int64_t* total, int threads) {
  for (std::size_t i = 0; i < n; ++i) {  // labels first, so errors are reported as the NumPy twin reports them
    if (outside(label[i], num_classes)) return {CountStatus::kBadLabel, i};
  }
  const auto row_cost = static_cast<std::size_t>(num_classes);
  const int t = choose_threads(n * row_cost, threads, kGrain * 4);
  std::vector<std::vector<int64_t>> partials;
  const CountStatus status = run_partials(
      n, t, static_cast<std::size_t>(2 * num_classes), partials,
      [&](std::size_t begin, std::size_t end, int64_t* hist) -> CountStatus {
        for (std::size_t i = begin; i < end; ++i) {
          bool nan = false;
          const int64_t rank = label_rank(logits + i * row_cost, label[i], num_classes, nan);
          if (nan) return {CountStatus::kNanRow, i};
          hist[2 * label[i]] += 1;
          hist[2 * label[i] + 1] += static_cast<int64_t>(rank < topk);
        }
        return {};
      });
  if (status.kind == CountStatus::kOk) reduce_pairs(partials, num_classes, correct, total);
  return status;
}

template CountStatus count_from_logits<float>(const float*, const int64_t*, std::size_t, int64_t, int64_t, int64_t*,
                                              int64_t*, int);
template CountStatus count_from_logits<double>(const double*, const int64_t*, std::size_t, int64_t, int64_t,
                                               int64_t*, int64_t*, int);

CountStatus confusion_matrix(const int64_t* pred, const int64_t* label, std::size_t n, int64_t num_classes,
                             int64_t* out, int threads) {
  const auto cells = static_cast<std::size_t>(num_classes) * static_cast<std::size_t>(num_classes);
  // Per-thread matrices only pay off when the input is much larger than the matrix.
  const int t = cells <= (std::size_t{1} << 20) && n >= 4 * cells ? choose_threads(n, threads, kGrain) : 1;
  std::vector<std::vector<int64_t>> partials;
  const CountStatus status =
      run_partials(n, t, cells, partials, [&](std::size_t begin, std::size_t end, int64_t* m) -> CountStatus {
        for (std::size_t i = begin; i < end; ++i) {
          if (outside(label[i], num_classes)) return {CountStatus::kBadLabel, i};
          if (outside(pred[i], num_classes)) return {CountStatus::kBadPred, i};
          m[label[i] * num_classes + pred[i]] += 1;
        }
        return {};
      });
  if (status.kind != CountStatus::kOk) return status;
  std::fill_n(out, cells, 0);
  for (const auto& part : partials) {
    for (std::size_t k = 0; k < cells; ++k) out[k] += part[k];
  }
  return status;
}

MergeStatus merge_counts(const int64_t* correct, const int64_t* total, std::size_t parts, std::size_t num_classes,
                         int64_t* correct_out, int64_t* total_out) {
  std::fill_n(correct_out, num_classes, 0);
  std::fill_n(total_out, num_classes, 0);
  for (std::size_t p = 0; p < parts; ++p) {
    for (std::size_t c = 0; c < num_classes; ++c) {
      const int64_t k = correct[p * num_classes + c], n = total[p * num_classes + c];
      if (k < 0) return MergeStatus::kNegative;
      if (k > n) return MergeStatus::kExceeds;
      // correct <= total, so checking the total is enough to keep both sums in range.
      if (total_out[c] > std::numeric_limits<int64_t>::max() - n) return MergeStatus::kOverflow;
      correct_out[c] += k;
      total_out[c] += n;
    }
  }
  return MergeStatus::kOk;
}

}  // namespace dnet_fast
