// The executor of csrc/cuda/*_image.cuh as a CUDA block of host threads: every thread runs the
// kernel body, for_each/for_each_warp split the loops by thread and warp, barriers are real,
// warps have 32 lanes whose shuffles go through a per-warp buffer between warp barriers, atomics
// are atomic. A missing barrier shows up as a race, a lane-dependent loop as a deadlock, and the
// lane-strided scans and warp reductions run as they do on a GPU.
#pragma once

#include <atomic>
#include <barrier>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace tt {

class HostBlock {
 public:
  static constexpr int kLanes = 32;

  explicit HostBlock(int threads)
      : threads_(threads), block_(threads), floats_(threads), ints_(threads) {
    for (int w = 0; w < threads / kLanes; ++w)
      warps_.push_back(std::make_unique<std::barrier<>>(kLanes));
  }

  // Runs body(exec) on every thread of the block and waits for them.
  template <typename Body>
  void run(Body body);

  int threads() const { return threads_; }

 private:
  friend class ThreadExec;
  int threads_;
  std::barrier<> block_;
  std::vector<std::unique_ptr<std::barrier<>>> warps_;
  std::vector<float> floats_;  // one slot per thread, for shuffles and reductions
  std::vector<int> ints_;
};

class ThreadExec {
 public:
  ThreadExec(HostBlock& block, int tid) : b_(block), tid_(tid) {}

  template <typename F>
  void for_each(int n, F f) {
    for (int i = tid_; i < n; i += b_.threads_) f(i);
    sync();
  }
  template <typename F>
  void for_each_warp(int n, F f) {
    for (int i = warp(); i < n; i += warps()) f(i, lane(), HostBlock::kLanes, warp());
    sync();
  }
  int warps() const { return b_.threads_ / HostBlock::kLanes; }

  float warp_sum(float v) {
    b_.floats_[tid_] = v;
    warp_sync();
    float total = 0.f;
    for (int l = 0; l < HostBlock::kLanes; ++l) total += b_.floats_[warp() * HostBlock::kLanes + l];
    warp_sync();
    return total;
  }
  void warp_argmax(float& v, int& i) {
    b_.floats_[tid_] = v;
    b_.ints_[tid_] = i;
    warp_sync();
    for (int l = 0; l < HostBlock::kLanes; ++l) {
      const float ov = b_.floats_[warp() * HostBlock::kLanes + l];
      const int oi = b_.ints_[warp() * HostBlock::kLanes + l];
      if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
    }
    warp_sync();
  }

  template <typename F>
  auto sum(int n, F f) -> decltype(f(0)) {
    using T = decltype(f(0));
    T v = 0;
    for (int i = tid_; i < n; i += b_.threads_) v += f(i);
    return reduce(v, [](T a, T b) { return a + b; });
  }
  template <typename F, typename T>
  T max(int n, F f, T lowest) {
    T v = lowest;
    for (int i = tid_; i < n; i += b_.threads_) {
      const T x = f(i);
      v = v > x ? v : x;
    }
    return reduce(v, [](T a, T b) { return a > b ? a : b; });
  }
  template <typename F>
  void single(F f) {
    if (tid_ == 0) f();
    sync();
  }
  int atomic_add(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }

  void sync() { b_.block_.arrive_and_wait(); }

 private:
  int lane() const { return tid_ % HostBlock::kLanes; }
  int warp() const { return tid_ / HostBlock::kLanes; }
  void warp_sync() { b_.warps_[warp()]->arrive_and_wait(); }

  template <typename T, typename Op>
  T reduce(T v, Op op) {
    if constexpr (std::is_same_v<T, int>)
      b_.ints_[tid_] = v;
    else
      b_.floats_[tid_] = v;
    sync();
    T total = slot<T>(0);
    for (int t = 1; t < b_.threads_; ++t) total = op(total, slot<T>(t));
    sync();
    return total;
  }
  template <typename T>
  T slot(int t) const {
    if constexpr (std::is_same_v<T, int>)
      return b_.ints_[t];
    else
      return b_.floats_[t];
  }

  HostBlock& b_;
  int tid_;
};

template <typename Body>
void HostBlock::run(Body body) {
  std::vector<std::thread> pool;
  for (int t = 0; t < threads_; ++t)
    pool.emplace_back([this, t, &body] {
      ThreadExec ex(*this, t);
      body(ex);
    });
  for (auto& thread : pool) thread.join();
}

}  // namespace tt
