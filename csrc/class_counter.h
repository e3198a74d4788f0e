// Per-class correct/total accumulation on host buffers, thread-parallel for large inputs. No Python, no libtorch.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dnet_fast {

// Where validation stopped: kOk, or the first bad label / prediction / NaN row at `index`.
struct CountStatus {
  enum Kind { kOk, kBadLabel, kBadPred, kNanRow } kind = kOk;
  std::size_t index = 0;
};

// correct[c] / total[c] (zeroed here, num_classes long each): for every sample i with label c, total[c] += 1 and
// correct[c] += (pred[i] == c). Stops at the first label outside [0, num_classes). threads <= 0: automatic.
CountStatus count_per_class(const int64_t* pred, const int64_t* label, std::size_t n, int64_t num_classes,
                            int64_t* correct, int64_t* total, int threads);

// As count_per_class, with sample i correct when label[i] ranks below topk among the row logits[i * C ..]: the
// rank counts larger logits plus equal logits at lower indices (ties go to the lowest index, like argmax).
// Stops at a bad label or a row holding NaN.
template <typename T>
CountStatus count_from_logits(const T* logits, const int64_t* label, std::size_t n, int64_t num_classes,
                              int64_t topk, int64_t* correct, int64_t* total, int threads);

// out (num_classes^2, zeroed here) [label * C + pred] += 1; both must lie in [0, num_classes).
CountStatus confusion_matrix(const int64_t* pred, const int64_t* label, std::size_t n, int64_t num_classes,
                             int64_t* out, int threads);

enum class MergeStatus { kOk, kNegative, kExceeds, kOverflow };

// Sums `parts` partial counts stored as (parts, C) row-major arrays into correct_out / total_out, checking that
// 0 <= correct <= total and that the sums fit in int64 (outputs unspecified otherwise).
MergeStatus merge_counts(const int64_t* correct, const int64_t* total, std::size_t parts, std::size_t num_classes,
                         int64_t* correct_out, int64_t* total_out);

}  // namespace dnet_fast
