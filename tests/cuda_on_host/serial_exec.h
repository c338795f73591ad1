// The executor of csrc/cuda/*_image.cuh on the CPU: one thread, a warp of one lane. Loops run in
// reverse, so a body that read what another iteration writes (a race on the GPU) would show up
// as a wrong result against the reference.
#pragma once

namespace tt {

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
