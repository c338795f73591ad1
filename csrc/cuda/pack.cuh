// 16-byte loads and stores of the per-image kernels (portable.h): V consecutive elements as one
// aligned access.
#pragma once

#include <cstdint>

#include "portable.h"

namespace tt {
namespace image {

// V consecutive elements, loaded or stored as one aligned access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
TT_DEVICE Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
TT_DEVICE void store_pack(T* p, const Pack<T, V>& pack) {
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// Elements per 16-byte access when every row of a [*, C] tensor at `ptr` starts aligned.
template <typename T>
inline int pack_width(const void* ptr, int64_t C) {
  constexpr int V = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && C % V == 0;
  return aligned ? V : 1;
}

}  // namespace image
}  // namespace tt
