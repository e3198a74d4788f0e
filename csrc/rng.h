// Portable counter-based randomness: every random word is a hash of (key, counter), so each output is a pure
// function of its inputs and identical on every compiler and machine. dnet_fast/_reference.py is the twin.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>

namespace dnet_fast {

inline constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;  // SplitMix64 increment

// Stream domains: independent key families for the different consumers of randomness.
enum Domain : uint64_t {
  kDomainMetaRound = 1,     // class order of a meta-batch round
  kDomainMetaClass = 2,     // per-class permutations for meta batches
  kDomainEpochClass = 3,    // per-class permutations for epoch orders
  kDomainEpochShuffle = 4,  // whole-epoch shuffles
  kDomainClassCycle = 5,    // class visiting order of the class-aware sampler
};

// SplitMix64 finaliser, a bijection of uint64.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Random word number x of stream key.
inline uint64_t hash2(uint64_t key, uint64_t x) { return mix64(key + kGolden * (x + 1)); }

// Root key of one domain for a user seed.
inline uint64_t seed_key(uint64_t seed, uint64_t domain) { return hash2(mix64(seed), domain); }

// High and low halves of the exact 128-bit product. The result is pure integer arithmetic, so the native 128-bit
// type (one instruction on x86-64/AArch64) and the portable 32-bit-limb fallback agree bit for bit.
inline std::pair<uint64_t, uint64_t> mul128(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
  __extension__ typedef unsigned __int128 u128;  // __extension__: GCC/Clang builtin, silent under -Wpedantic
  const u128 product = static_cast<u128>(a) * b;
  return {static_cast<uint64_t>(product >> 64), static_cast<uint64_t>(product)};
#else
  const uint64_t a_lo = a & 0xFFFFFFFFULL, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFULL, b_hi = b >> 32;
  const uint64_t lh = a_lo * b_hi, hl = a_hi * b_lo;
  const uint64_t mid = ((a_lo * b_lo) >> 32) + (lh & 0xFFFFFFFFULL) + (hl & 0xFFFFFFFFULL);
  return {a_hi * b_hi + (lh >> 32) + (hl >> 32) + (mid >> 32), a * b};
#endif
}

// Lemire's nearly divisionless method: uniform in [0, bound) from word `index` of `key`; bound >= 1. A rejected
// word is replaced by mix64(word + golden) (the chance of even one retry is bound / 2^64).
inline uint64_t bounded(uint64_t key, uint64_t index, uint64_t bound) {
  uint64_t x = hash2(key, index);
  auto [high, low] = mul128(x, bound);
  if (low < bound) {
    const uint64_t threshold = (0 - bound) % bound;
    while (low < threshold) {
      x = mix64(x + kGolden);
      std::tie(high, low) = mul128(x, bound);
    }
  }
  return high;
}

// Fisher-Yates: for i = n-1 .. 1 swap a[i] with a[bounded(key, i, i + 1)].
template <typename T>
void permute(T* a, std::size_t n, uint64_t key) {
  for (std::size_t i = n; i-- > 1;) {
    const auto j = static_cast<std::size_t>(bounded(key, i, i + 1));
    std::swap(a[i], a[j]);
  }
}

// floor(a * b / c) and the remainder, exact, for c > 0 and a quotient below 2^64.
inline std::pair<uint64_t, uint64_t> muldivmod(uint64_t a, uint64_t b, uint64_t c) {
  auto [high, low] = mul128(a, b);
  uint64_t q = 0, r = high;  // restoring long division; r < c holds throughout
  for (int bit = 63; bit >= 0; --bit) {
    const bool carry = (r >> 63) != 0;
    r = (r << 1) | ((low >> bit) & 1);
    q <<= 1;
    if (carry || r >= c) {
      r -= c;
      q |= 1;
    }
  }
  return {q, r};
}

}  // namespace dnet_fast
