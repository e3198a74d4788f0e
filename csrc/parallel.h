// Splitting a loop over std::threads. No Python, no libtorch.
#pragma once

#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

namespace dnet_fast {

// Thread count for n items: `requested` when positive, otherwise one thread per `grain` items up to the hardware
// concurrency (small inputs stay on the calling thread, where spawning would cost more than it saves).
inline int choose_threads(std::size_t n, int requested, std::size_t grain) {
  if (requested > 0) return static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(requested), std::max<std::size_t>(n, 1)));
  const auto hw = static_cast<std::size_t>(std::max(1U, std::thread::hardware_concurrency()));
  return static_cast<int>(std::clamp<std::size_t>(n / grain, 1, std::min<std::size_t>(hw, 64)));
}

// Runs fn(thread_index, begin, end) over `threads` contiguous chunks of [0, n); chunk 0 on the calling thread.
template <typename Fn>
void parallel_chunks(std::size_t n, int threads, Fn&& fn) {
  const auto t = static_cast<std::size_t>(threads);
  auto bound = [&](std::size_t i) { return n / t * i + std::min(i, n % t); };
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (std::size_t i = 1; i < t; ++i) pool.emplace_back([&, i] { fn(i, bound(i), bound(i + 1)); });
  fn(std::size_t{0}, bound(0), bound(1));
  for (auto& worker : pool) worker.join();
}

}  // namespace dnet_fast
