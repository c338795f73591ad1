// The executor of csrc/cuda/*_image.cuh on the CPU: one thread, a warp of one lane. Loops run in
// reverse, so a body that read what another iteration writes (a race on the GPU) would show up
// as a wrong result against the reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace tt {

// A block's dynamic shared memory: 16-byte aligned, and poisoned with NaN before each image, so
// that reading anything the image did not write shows in the results.
class SharedMemory {
 public:
  explicit SharedMemory(int64_t bytes) : quads_((bytes + 15) / 16) {}
  void* poisoned() {
    for (auto& q : quads_)
      for (float& f : q.v) f = NAN;
    return quads_.data();
  }

 private:
  struct alignas(16) Quad {
    float v[4];
  };
  std::vector<Quad> quads_;
};

struct SerialExec {
  template <typename F>
  void for_each(int n, F f) {
    for (int i = n - 1; i >= 0; --i) f(i);
  }
  template <typename F>
  void for_each_warp(int n, F f) {
    for (int i = n - 1; i >= 0; --i) f(i, 0, 1, 0);
  }
  int warps() const { return 1; }
  float warp_sum(float v) { return v; }
  void warp_argmax(float&, int&) {}
  template <typename F>
  auto sum(int n, F f) -> decltype(f(0)) {
    decltype(f(0)) v = 0;
    for (int i = 0; i < n; ++i) v += f(i);
    return v;
  }
  template <typename F, typename T>
  T max(int n, F f, T lowest) {
    for (int i = 0; i < n; ++i) lowest = lowest > f(i) ? lowest : f(i);
    return lowest;
  }
  template <typename F>
  void single(F f) {
    f();
  }
  int atomic_add(int* p, int v) {
    const int old = *p;
    *p += v;
    return old;
  }
};

}  // namespace tt
