#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "rng.h"

namespace dnet_fast {

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

void check_range(int64_t value, int64_t low, int64_t limit, const char* name) {
  if (value < low || value >= limit) {
    fail(std::string(name) + " must be in [" + std::to_string(low) + ", " + std::to_string(limit) + "), got " +
         std::to_string(value));
  }
}

// Exact integer square root (floor); x < 2^63.
uint64_t isqrt(uint64_t x) {
  auto r = static_cast<uint64_t>(std::sqrt(static_cast<double>(x)));
  while (r * r > x) --r;
  while ((r + 1) * (r + 1) <= x) ++r;
  return r;
}

// Largest-remainder apportionment of `length` samples by integer weights; ties go to the lower class.
std::vector<int64_t> apportion(const std::vector<uint64_t>& weights, uint64_t total, int64_t length) {
  const std::size_t p = weights.size();
  std::vector<int64_t> quotas(p);
  std::vector<uint64_t> remainders(p);
  int64_t leftover = length;
  for (std::size_t c = 0; c < p; ++c) {
    const auto [q, r] = muldivmod(static_cast<uint64_t>(length), weights[c], total);
    quotas[c] = static_cast<int64_t>(q);
    remainders[c] = r;
    leftover -= quotas[c];
  }
  std::vector<std::size_t> by_remainder(p);
  std::iota(by_remainder.begin(), by_remainder.end(), std::size_t{0});
  std::sort(by_remainder.begin(), by_remainder.end(), [&](std::size_t a, std::size_t b) {
    return remainders[a] != remainders[b] ? remainders[a] > remainders[b] : a < b;
  });
  for (int64_t i = 0; i < leftover; ++i) quotas[by_remainder[static_cast<std::size_t>(i)]] += 1;
  return quotas;
}

std::vector<int64_t> sqrt_quotas(const std::vector<int64_t>& sizes, int64_t length) {
  std::vector<uint64_t> weights(sizes.size());
  uint64_t total = 0;
  for (std::size_t c = 0; c < sizes.size(); ++c) {
    weights[c] = isqrt(static_cast<uint64_t>(sizes[c]) << 32);  // exact integers: portable across platforms
    total += weights[c];
  }
  return apportion(weights, total, length);
}

// Kang et al.: p_c(t) = (1 - t/T) n_c / N + (t/T) / P, scaled by T * N * P to integers, t capped at T.
std::vector<int64_t> progressive_quotas(const std::vector<int64_t>& sizes, int64_t n, int64_t epoch,
                                        int64_t num_epochs, int64_t length) {
  const auto t = static_cast<uint64_t>(std::min(epoch, num_epochs));
  const auto big_t = static_cast<uint64_t>(num_epochs);
  const auto p = static_cast<uint64_t>(sizes.size()), nn = static_cast<uint64_t>(n);
  std::vector<uint64_t> weights(sizes.size());
  for (std::size_t c = 0; c < sizes.size(); ++c) weights[c] = (big_t - t) * static_cast<uint64_t>(sizes[c]) * p + t * nn;
  return apportion(weights, big_t * nn * p, length);
}

// Validates the sizes before the class table is built from them.
const int64_t* checked_sizes(const int64_t* labels, std::size_t n, int64_t num_classes) {
  check_range(num_classes, 1, kMaxCount, "num_classes");
  check_range(static_cast<int64_t>(n), 0, kMaxCount, "len(labels)");
  return labels;
}

}  // namespace

ClassTable::ClassTable(const int64_t* labels, std::size_t n, int64_t num_classes, const char* name)
    : order(n), offsets(static_cast<std::size_t>(num_classes) + 1, 0) {
  for (std::size_t i = 0; i < n; ++i) {
    if (labels[i] < 0 || labels[i] >= num_classes) {
      fail(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(labels[i]) + " is outside [0, " +
           std::to_string(num_classes) + ")");
    }
    ++offsets[static_cast<std::size_t>(labels[i]) + 1];
  }
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (std::size_t i = 0; i < n; ++i) order[static_cast<std::size_t>(fill[static_cast<std::size_t>(labels[i])]++)] =
      static_cast<int64_t>(i);
}

ClassDrawer::ClassDrawer(const ClassTable& table, uint64_t base)
    : table_(table),
      class_key_(static_cast<std::size_t>(table.num_classes())),
      cycle_(class_key_.size(), 0),
      cached_(class_key_.size(), ~uint64_t{0}),
      pos_(class_key_.size(), 0),
      perm_(table.order) {
  for (std::size_t c = 0; c < class_key_.size(); ++c) class_key_[c] = hash2(base, c);
}

void ClassDrawer::seek(int64_t c, uint64_t d) {
  const auto n = static_cast<uint64_t>(table_.size(c));
  cycle_[c] = d / n;
  pos_[c] = d % n;
}

void ClassDrawer::reshuffle(int64_t c) {
  const auto begin = static_cast<std::size_t>(table_.offsets[c]);
  const auto n = static_cast<std::size_t>(table_.size(c));
  std::copy_n(table_.order.begin() + static_cast<std::ptrdiff_t>(begin), n,
              perm_.begin() + static_cast<std::ptrdiff_t>(begin));
  permute(perm_.data() + begin, n, hash2(class_key_[c], cycle_[c]));
  cached_[c] = cycle_[c];
}

MetaSampler::MetaSampler(const int64_t* labels, std::size_t n, int64_t num_classes, uint64_t seed)
    : table_(checked_sizes(labels, n, num_classes), n, num_classes, "labels"),
      round_key_(seed_key(seed, kDomainMetaRound)),
      drawer_(table_, seed_key(seed, kDomainMetaClass)),
      round_perm_(static_cast<std::size_t>(num_classes)) {}

std::vector<int64_t> MetaSampler::class_sizes() const {
  std::vector<int64_t> sizes(static_cast<std::size_t>(table_.num_classes()));
  for (int64_t c = 0; c < table_.num_classes(); ++c) sizes[static_cast<std::size_t>(c)] = table_.size(c);
  return sizes;
}

void MetaSampler::load_round(uint64_t round) {
  if (round == loaded_round_) return;
  std::iota(round_perm_.begin(), round_perm_.end(), int64_t{0});
  permute(round_perm_.data(), round_perm_.size(), hash2(round_key_, round));
  loaded_round_ = round;
}

void MetaSampler::check_request(int64_t step, int64_t k, int64_t m) {
  constexpr int64_t kLimit = int64_t{1} << 62;
  check_range(step, 0, kLimit, "step");
  check_range(k, 0, kLimit, "k");
  check_range(m, 1, kMaxCount, "m");
  if (step + k > (kLimit - 1) / m) fail("(step + k) * m must be below 2**62");
}

void MetaSampler::batches(int64_t step, int64_t k, int64_t m, int64_t* out) {
  check_request(step, k, m);
  if (k == 0) return;
  const std::lock_guard<std::mutex> lock(mutex_);
  const auto num_c = static_cast<uint64_t>(table_.num_classes());
  const auto um = static_cast<uint64_t>(m);
  const uint64_t g = std::gcd(um, num_c), per_round = num_c / g, draws_per_round = um / g;
  uint64_t round = static_cast<uint64_t>(step) / per_round, b = static_cast<uint64_t>(step) % per_round;
  // Class c's draws are consecutive along the slot stream, so only the first slot needs the closed form:
  // draws before slot t0 = b * m of round R are R * (m / g) + #{t < t0 : t mod C = position of c in pi_R}.
  load_round(round);
  if (step != resume_step_ || m != resume_m_) {
    const uint64_t t0 = b * um;
    for (uint64_t p = 0; p < num_c; ++p) {
      const int64_t c = round_perm_[p];
      if (table_.size(c) > 0) drawer_.seek(c, round * draws_per_round + (t0 + num_c - 1 - p) / num_c);
    }
  }
  resume_step_ = -1;  // stays invalid if a class without samples aborts the loop
  for (int64_t s = 0; s < k; ++s) {
    uint64_t pos = (b * um) % num_c;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t c = round_perm_[pos];
      if (table_.size(c) == 0) {
        fail("class " + std::to_string(c) + " has no samples but a meta batch asks for it");
      }
      *out++ = drawer_.next(c);
      if (++pos == num_c) pos = 0;
    }
    if (++b == per_round) {
      b = 0;
      load_round(++round);
    }
  }
  resume_step_ = step + k;
  resume_m_ = m;
}

EpochKind parse_epoch_kind(const std::string& kind) {
  if (kind == "uniform") return EpochKind::kUniform;
  if (kind == "class_aware") return EpochKind::kClassAware;
  if (kind == "sqrt") return EpochKind::kSqrt;
  if (kind == "progressive") return EpochKind::kProgressive;
  fail("kind must be one of uniform, class_aware, sqrt, progressive; got '" + kind + "'");
}

namespace {

int64_t global_length(const EpochSpec& spec, std::size_t n) {
  return spec.num_samples == -1 ? static_cast<int64_t>(n) : spec.num_samples;
}

// Official ClassAwareSampler stream: classes visited in a fresh random order per cycle, per_visit draws each.
// Epoch e covers visits e * V .. e * V + V - 1 of one endless stream, V = ceil(length / per_visit).
void class_aware(const ClassTable& table, const std::vector<int64_t>& present, const EpochSpec& spec,
                 int64_t length, int64_t* order) {
  ClassDrawer drawer(table, seed_key(spec.seed, kDomainEpochClass));
  const uint64_t cycle_key = seed_key(spec.seed, kDomainClassCycle);
  const auto p = static_cast<uint64_t>(present.size()), per_visit = static_cast<uint64_t>(spec.per_visit);
  const uint64_t visits = (static_cast<uint64_t>(length) + per_visit - 1) / per_visit;
  const uint64_t v0 = static_cast<uint64_t>(spec.epoch) * visits;
  uint64_t cycle = v0 / p, pos = v0 % p;
  std::vector<int64_t> perm(p);
  auto load = [&] {
    std::iota(perm.begin(), perm.end(), int64_t{0});
    permute(perm.data(), p, hash2(cycle_key, cycle));
  };
  load();
  for (uint64_t q = 0; q < p; ++q) {  // classes already visited in this cycle have one more visit behind them
    drawer.seek(present[static_cast<std::size_t>(perm[q])], (cycle + (q < pos ? 1 : 0)) * per_visit);
  }
  for (int64_t i = 0; i < length;) {
    const int64_t c = present[static_cast<std::size_t>(perm[pos])];
    for (uint64_t u = 0; u < per_visit && i < length; ++u) order[i++] = drawer.next(c);
    if (++pos == p) {
      pos = 0;
      ++cycle;
      load();
    }
  }
}

// sqrt / progressive: per-class quotas concatenated in class order, then shuffled as a whole.
void by_quota(const ClassTable& table, const std::vector<int64_t>& present, const EpochSpec& spec, std::size_t n,
              int64_t length, int64_t* order) {
  std::vector<int64_t> sizes(present.size());
  for (std::size_t i = 0; i < present.size(); ++i) sizes[i] = table.size(present[i]);
  std::vector<int64_t> quotas, firsts(present.size(), 0);
  if (spec.kind == EpochKind::kSqrt) {
    quotas = sqrt_quotas(sizes, length);
    for (std::size_t i = 0; i < present.size(); ++i) firsts[i] = quotas[i] * spec.epoch;
  } else {
    const auto nn = static_cast<int64_t>(n);
    // Quotas stop changing at t = T, so epochs past T are added in one multiplication.
    for (int64_t t = 0; t < std::min(spec.epoch, spec.num_epochs + 1); ++t) {
      const auto q = progressive_quotas(sizes, nn, t, spec.num_epochs, length);
      const int64_t times = t == spec.num_epochs ? spec.epoch - spec.num_epochs : 1;
      for (std::size_t i = 0; i < present.size(); ++i) firsts[i] += q[i] * times;
    }
    quotas = progressive_quotas(sizes, nn, spec.epoch, spec.num_epochs, length);
  }
  ClassDrawer drawer(table, seed_key(spec.seed, kDomainEpochClass));
  int64_t* cursor = order;
  for (std::size_t i = 0; i < present.size(); ++i) {
    if (quotas[i] == 0) continue;
    drawer.seek(present[i], static_cast<uint64_t>(firsts[i]));
    for (int64_t j = 0; j < quotas[i]; ++j) *cursor++ = drawer.next(present[i]);
  }
  permute(order, static_cast<std::size_t>(length), hash2(seed_key(spec.seed, kDomainEpochShuffle), spec.epoch));
}

}  // namespace

int64_t epoch_rank_length(const EpochSpec& spec, std::size_t n) {
  check_range(static_cast<int64_t>(n), 0, kMaxCount, "len(labels)");
  check_range(spec.epoch, 0, kMaxCount, "epoch");
  check_range(spec.world_size, 1, kMaxCount, "world_size");
  if (spec.rank < 0 || spec.rank >= spec.world_size) {
    fail("rank must be in [0, world_size=" + std::to_string(spec.world_size) + "), got " + std::to_string(spec.rank));
  }
  check_range(spec.num_epochs, 1, kMaxCount, "num_epochs");
  check_range(spec.per_visit, 1, kMaxCount, "per_visit");
  const int64_t length = global_length(spec, n);
  if (spec.num_samples != -1) check_range(spec.num_samples, 0, kMaxCount, "num_samples");
  if (spec.kind == EpochKind::kUniform && length != static_cast<int64_t>(n)) {
    fail("num_samples must be left unset (or equal len(labels)) for kind='uniform'");
  }
  return (length + spec.world_size - 1) / spec.world_size;
}

void epoch_order(const int64_t* labels, std::size_t n, const EpochSpec& spec, int64_t* out) {
  const int64_t per_rank = epoch_rank_length(spec, n);
  int64_t num_classes = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (labels[i] < 0 || labels[i] >= kMaxCount) {
      fail("labels[" + std::to_string(i) + "] = " + std::to_string(labels[i]) + " is outside [0, 2147483648)");
    }
    num_classes = std::max(num_classes, labels[i] + 1);
  }
  const int64_t length = global_length(spec, n);
  if (length > 0 && n == 0) fail("labels is empty but num_samples > 0");
  if (length == 0) return;
  std::vector<int64_t> order(static_cast<std::size_t>(length));
  const uint64_t shuffle_key = hash2(seed_key(spec.seed, kDomainEpochShuffle), static_cast<uint64_t>(spec.epoch));
  if (spec.kind == EpochKind::kUniform) {
    std::iota(order.begin(), order.end(), int64_t{0});
    permute(order.data(), order.size(), shuffle_key);
  } else {
    const ClassTable table(labels, n, num_classes, "labels");
    std::vector<int64_t> present;
    for (int64_t c = 0; c < num_classes; ++c) {
      if (table.size(c) > 0) present.push_back(c);
    }
    if (spec.kind == EpochKind::kProgressive) {
      const auto nn = static_cast<uint64_t>(n), p = static_cast<uint64_t>(present.size());
      if (p > std::numeric_limits<uint64_t>::max() / nn / static_cast<uint64_t>(spec.num_epochs)) {
        fail("num_epochs * len(labels) * number of classes must be below 2**64");
      }
    }
    if (spec.kind == EpochKind::kClassAware) {
      class_aware(table, present, spec, length, order.data());
    } else {
      by_quota(table, present, spec, n, length, order.data());
    }
  }
  // DistributedSampler split: wrap-pad to a multiple of world_size, rank r takes r, r + world_size, ...
  const auto ulen = static_cast<uint64_t>(length);
  for (int64_t i = 0; i < per_rank; ++i) {
    out[i] = order[static_cast<std::size_t>((static_cast<uint64_t>(i * spec.world_size + spec.rank)) % ulen)];
  }
}

}  // namespace dnet_fast
