// Launches per-image CUDA code on the host: with SerialExec (threads = 0) or as a block of
// `threads` host threads (ThreadExec), one image after another, like a grid of one block at a time.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <c10/util/Exception.h>

#include "serial_exec.h"
#include "threaded_exec.h"

namespace tt {

// A block's dynamic shared memory: 16-byte aligned, poisoned with NaN before each image (so that
// reading anything the image did not write shows in the results), and followed by a canary that
// must survive (so that writing past the planned size fails the launch).
class SharedMemory {
 public:
  explicit SharedMemory(int64_t bytes) : used_((bytes + 15) / 16), quads_(used_ + kCanary) {
    for (int64_t q = used_; q < used_ + kCanary; ++q)
      for (float& f : quads_[q].v) f = kCanaryValue;
  }
  void* data() { return quads_.data(); }
  void poison() {
    for (int64_t q = 0; q < used_; ++q)
      for (float& f : quads_[q].v) f = NAN;
  }
  bool canary_intact() const {
    for (int64_t q = used_; q < used_ + kCanary; ++q)
      for (const float f : quads_[q].v)
        if (f != kCanaryValue) return false;
    return true;
  }

 private:
  static constexpr int64_t kCanary = 64;
  static constexpr float kCanaryValue = -1234.5f;
  struct alignas(16) Quad {
    float v[4];
  };
  int64_t used_;
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
      TORCH_CHECK(shared.canary_intact(), "a kernel wrote past its planned shared memory");
    }
    return;
  }
  bool intact = true;  // threads must not throw: the others would wait at a barrier forever
  HostBlock block(threads);
  block.run([&](ThreadExec& ex) {
    for (int64_t b = 0; b < B; ++b) {
      ex.single([&] { shared.poison(); });
      per_image(ex, b, shared.data());
      ex.sync();
      ex.single([&] { intact = intact && shared.canary_intact(); });
    }
  });
  TORCH_CHECK(intact, "a kernel wrote past its planned shared memory");
}

}  // namespace tt
