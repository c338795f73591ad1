// Launches per-image CUDA code on the host: with SerialExec (threads = 0) or as a block of
// `threads` host threads (ThreadExec), one image after another, like a grid of one block at a time.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "serial_exec.h"
#include "threaded_exec.h"

namespace tt {

// A block's dynamic shared memory: 16-byte aligned, and poisoned with NaN before each image, so
// that reading anything the image did not write shows in the results.
class SharedMemory {
 public:
  explicit SharedMemory(int64_t bytes) : quads_((bytes + 15) / 16) {}
  void* data() { return quads_.data(); }
  void poison() {
    for (auto& q : quads_)
      for (float& f : q.v) f = NAN;
  }

 private:
  struct alignas(16) Quad {
    float v[4];
  };
  std::vector<Quad> quads_;
};

// Warps whose per-warp buffers the launch must size.
inline int host_warps(int threads) { return threads == 0 ? 1 : threads / HostBlock::kLanes; }

// per_image(ex, b, shared) for every image b < B, the shared memory poisoned before each.
template <typename PerImage>
void launch_on_host(int64_t B, int threads, int64_t shared_bytes, PerImage per_image) {
  SharedMemory shared(shared_bytes);
  if (threads == 0) {
    SerialExec ex;
    for (int64_t b = 0; b < B; ++b) {
      shared.poison();
      per_image(ex, b, shared.data());
    }
    return;
  }
  HostBlock block(threads);
  block.run([&](ThreadExec& ex) {
    for (int64_t b = 0; b < B; ++b) {
      ex.single([&] { shared.poison(); });
      per_image(ex, b, shared.data());
      ex.sync();
    }
  });
}

}  // namespace tt
