// Class-balanced meta batches and full-epoch sample orders. No Python, no libtorch.
// Every output is a pure function of (seed, epoch, rank, step); dnet_fast/_reference.py is the readable twin.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace dnet_fast {

inline constexpr int64_t kMaxCount = int64_t{1} << 31;  // sample counts and epoch lengths stay below this

// Per-class index table in CSR layout: the members of class c are order[offsets[c] .. offsets[c + 1]), ascending.
struct ClassTable {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;

  // Throws std::invalid_argument naming `name` when a label lies outside [0, num_classes).
  ClassTable(const int64_t* labels, std::size_t n, int64_t num_classes, const char* name);
  int64_t num_classes() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t size(int64_t c) const { return offsets[c + 1] - offsets[c]; }
};

// Streams draws from every class: draw d of class c is element d mod n_c of the permutation of the class's members
// keyed by hash2(hash2(base, c), d / n_c). The permutation of the current pass is cached per class.
class ClassDrawer {
 public:
  ClassDrawer(const ClassTable& table, uint64_t base);
  void seek(int64_t c, uint64_t d);  // the next draw of class c is draw number d (class must be non-empty)
  int64_t next(int64_t c) {
    if (pos_[c] == static_cast<uint64_t>(table_.size(c))) {
      pos_[c] = 0;
      ++cycle_[c];
    }
    if (cached_[c] != cycle_[c]) reshuffle(c);
    return perm_[table_.offsets[c] + pos_[c]++];
  }

 private:
  void reshuffle(int64_t c);
  const ClassTable& table_;
  std::vector<uint64_t> class_key_, cycle_, cached_, pos_;
  std::vector<int64_t> perm_;
};

// Class-balanced meta batches. Batch s of size m over C classes: with g = gcd(m, C) a round is L = C / g batches;
// round R uses a class permutation pi_R; slot j of batch s = R * L + b takes class pi_R[t mod C], t = b * m + j,
// as that class's draw number R * (m / g) + t / C.
class MetaSampler {
 public:
  MetaSampler(const int64_t* labels, std::size_t n, int64_t num_classes, uint64_t seed);
  // Writes batches step .. step + k - 1 to out (k * m values). Throws std::invalid_argument on bad sizes or when a
  // batch needs a class without samples. Thread-safe.
  void batches(int64_t step, int64_t k, int64_t m, int64_t* out);
  // Throws std::invalid_argument unless 0 <= step, 0 <= k, 1 <= m < 2^31 and (step + k) * m < 2^62.
  static void check_request(int64_t step, int64_t k, int64_t m);
  std::vector<int64_t> class_sizes() const;
  int64_t num_classes() const { return table_.num_classes(); }

 private:
  void load_round(uint64_t round);
  ClassTable table_;
  uint64_t round_key_;
  ClassDrawer drawer_;
  std::vector<int64_t> round_perm_;
  uint64_t loaded_round_ = ~uint64_t{0};
  // Where the last successful call stopped: a call continuing from there (the trainer's step-by-step batch()
  // calls) skips the O(C) repositioning of every class.
  int64_t resume_step_ = -1, resume_m_ = 0;
  std::mutex mutex_;
};

enum class EpochKind { kUniform, kClassAware, kSqrt, kProgressive };

// Parses "uniform" | "class_aware" | "sqrt" | "progressive"; throws std::invalid_argument otherwise.
EpochKind parse_epoch_kind(const std::string& kind);

struct EpochSpec {
  EpochKind kind = EpochKind::kUniform;
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t num_epochs = 1;
  int64_t num_samples = -1;  // global epoch length; -1 = number of labels
  int64_t per_visit = 4;     // samples per class visit (class_aware)
};

// Validates spec against n labels and returns this rank's length ceil(L / world_size).
int64_t epoch_rank_length(const EpochSpec& spec, std::size_t n);

// Writes this rank's order (epoch_rank_length values) to out.
void epoch_order(const int64_t* labels, std::size_t n, const EpochSpec& spec, int64_t* out);

}  // namespace dnet_fast
