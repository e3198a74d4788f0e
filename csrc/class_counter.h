// Per-class top-k correct/total counting from host logits, thread-parallel for large inputs. No Python, no libtorch.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dnet_fast {

// Where validation stopped: kOk, or the first label outside [0, num_classes) at `index`.
struct CountStatus {
  enum Kind { kOk, kBadLabel } kind = kOk;
  std::size_t index = 0;
};

// correct[c] / total[c] (zeroed here, num_classes long each) over the rows logits[i * C .. (i + 1) * C): for every
// sample i with label c, total[c] += 1, and correct[c] += 1 when the label ranks below topk among the row: the rank
// counts larger logits plus equal logits at lower indices (ties go to the lowest index, like argmax). A row holding
// any non-finite logit (NaN, +inf or -inf) is never correct. Checks every label before counting and stops at the
// first one outside [0, num_classes), outputs untouched. threads <= 0: automatic.
template <typename T>
CountStatus count_from_logits(const T* logits, const int64_t* label, std::size_t n, int64_t num_classes,
                              int64_t topk, int64_t* correct, int64_t* total, int threads);

}  // namespace dnet_fast
