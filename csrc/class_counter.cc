#include "class_counter.h"

#include <algorithm>
#include <vector>

#include "parallel.h"

namespace dnet_fast {

namespace {

constexpr std::size_t kGrain = std::size_t{1} << 20;  // logits per thread before another thread pays off

bool outside(int64_t v, int64_t num_classes) { return static_cast<uint64_t>(v) >= static_cast<uint64_t>(num_classes); }

// 1 for NaN and +-inf, 0 for finite x, without a branch: x - x is +0 exactly for finite x (IEEE 754, valid without
// -ffast-math) and NaN otherwise, and NaN != 0 holds.
template <typename T>
int32_t non_finite(T x) {
  return static_cast<int32_t>(x - x != T{0});
}

// Rank of the label in one row: larger logits anywhere plus equal logits at lower indices. Sets `bad` when the row
// holds a non-finite logit (comparisons with NaN are false, so it must be detected apart). One pass over the row;
// 32-bit accumulators let the compiler keep four or eight lanes per vector register (rows are shorter than 2^31).
template <typename T>
int64_t label_rank(const T* row, int64_t y, int64_t num_classes, bool& bad) {
  const T zy = row[y];
  int32_t rank = 0, odd = non_finite(zy);
  for (int64_t j = 0; j < y; ++j) {
    rank += static_cast<int32_t>(row[j] >= zy);
    odd |= non_finite(row[j]);
  }
  for (int64_t j = y + 1; j < num_classes; ++j) {
    rank += static_cast<int32_t>(row[j] > zy);
    odd |= non_finite(row[j]);
  }
  bad = odd != 0;
  return rank;
}

}  // namespace

template <typename T>
CountStatus count_from_logits(const T* logits, const int64_t* label, std::size_t n, int64_t num_classes,
                              int64_t topk, int64_t* correct, int64_t* total, int threads) {
  for (std::size_t i = 0; i < n; ++i) {  // labels first, so errors are reported as the NumPy twin reports them
    if (outside(label[i], num_classes)) return {CountStatus::kBadLabel, i};
  }
  const auto classes = static_cast<std::size_t>(num_classes);
  const int t = choose_threads(n * classes, threads, kGrain);
  // Per-thread (total, correct) pairs per class, summed in thread order afterwards.
  std::vector<std::vector<int64_t>> partials(static_cast<std::size_t>(t), std::vector<int64_t>(2 * classes, 0));
  parallel_chunks(n, t, [&](std::size_t part, std::size_t begin, std::size_t end) {
    int64_t* hist = partials[part].data();
    for (std::size_t i = begin; i < end; ++i) {
      bool bad = false;
      const int64_t rank = label_rank(logits + i * classes, label[i], num_classes, bad);
      const auto c = static_cast<std::size_t>(label[i]);
      hist[2 * c] += 1;
      hist[2 * c + 1] += static_cast<int64_t>(rank < topk && !bad);
    }
  });
  std::fill_n(correct, num_classes, 0);
  std::fill_n(total, num_classes, 0);
  for (const auto& part : partials) {
    for (std::size_t c = 0; c < classes; ++c) {
      total[c] += part[2 * c];
      correct[c] += part[2 * c + 1];
    }
  }
  return {};
}

template CountStatus count_from_logits<float>(const float*, const int64_t*, std::size_t, int64_t, int64_t, int64_t*,
                                              int64_t*, int);
template CountStatus count_from_logits<double>(const double*, const int64_t*, std::size_t, int64_t, int64_t,
                                               int64_t*, int64_t*, int);

}  // namespace dnet_fast
