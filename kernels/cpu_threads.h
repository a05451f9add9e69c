// The helper threads every C++ CPU kernel of spanjax shares (one pool per process: all the
// kernels are compiled into one library, `cpu_library.py`).
//
// XLA's intra-op pool would do, but its threads sleep between tasks, and a decode step's
// products and attentions take 10-100 us each, about what waking a thread costs: measured,
// its helpers joined too late to take any chunk. These spin for a short while after each
// call (the next one of a decode step comes within microseconds) and then sleep, so prefill
// and idle processes do not pay for them. A longer spin (2 ms) measured slower: it steals the
// core XLA's own ops need between two kernel calls.
//
// Work is split into chunks claimed from an atomic counter by the calling thread and by the
// helpers; the caller never waits for a chunk nobody has claimed, so a busy helper cannot
// stall it.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace spanjax {

struct Work {
  std::function<void(int64_t)> chunk;  // runs chunk c, 0 <= c < num_chunks
  int64_t num_chunks = 0;
  // Own cache lines: the counters change while every thread reads the fields above.
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> finished{0};

  void RunChunks() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      chunk(c);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: threads outlive static teardown
    return *helpers;
  }

  int64_t threads() const { return 1 + static_cast<int64_t>(threads_.size()); }  // caller included

  // Runs every chunk of `work` on the caller and the helpers; alone when another call holds
  // the helpers (two XLA devices in one process) or there is only one chunk.
  void Run(const std::shared_ptr<Work>& work) {
    std::unique_lock<std::mutex> busy(busy_, std::defer_lock);
    if (work->num_chunks < 2 || threads_.empty() || !busy.try_lock()) {
      work->RunChunks();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = work;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work->RunChunks();
    // Every chunk is claimed now; wait only for those still being computed.
    while (work->finished.load(std::memory_order_acquire) < work->num_chunks) _mm_pause();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(300);

  Helpers() {
    const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
    for (int64_t i = 0; i + 1 < cores; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        _mm_pause();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      std::shared_ptr<Work> work;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        work = job_;
        seen = generation_.load(std::memory_order_acquire);
      }
      if (work) work->RunChunks();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_;   // one kernel call at a time uses the helpers
  std::mutex mutex_;  // guards job_ and the sleep
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Work> job_;
};

// Runs chunk(c) for c in [0, num_chunks) on the shared threads.
inline void ParallelFor(int64_t num_chunks, std::function<void(int64_t)> chunk) {
  auto work = std::make_shared<Work>();
  work->chunk = std::move(chunk);
  work->num_chunks = num_chunks;
  Helpers::Get().Run(work);
}

}  // namespace spanjax
