// C++20 shim that runs Metal Shading Language kernel text on CPU threads (llmtrain tests).
//
// The kernel source MLX generates (signature + body) is compiled as C++ after this header:
// address-space qualifiers are empty macros (set at the end of this file), `threadgroup` arrays
// become function statics (the driver runs one threadgroup at a time, so they are shared by
// exactly the threads of the running threadgroup), `threadgroup_barrier` is a barrier over the
// threadgroup's threads, and simd_* reductions/shuffles exchange values through per-simdgroup
// slots guarded by a barrier over the simdgroup's *active* lanes (a lane that has returned
// from the kernel drops out of both barriers and is excluded from reductions).
// Every thread of a threadgroup runs concurrently on its own std::thread, so a missing barrier
// shows up as a wrong result or, under -fsanitize=thread, as a reported data race.
#pragma once

#include <sched.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
struct uint3 {
  uint x, y, z;
};
struct uint2 {
  uint x, y;
};
typedef _Float16 half;
typedef half float16_t;

// bfloat16 storage with float conversions (round to nearest even), like Metal's bfloat.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

namespace msl {

// A barrier whose only synchronisation is its own atomics (a spinlock for arrivals, a
// generation counter waited on with a raw futex). std::barrier is not used: libstdc++ waits
// through a global hashed pool of mutexes, which gives ThreadSanitizer happens-before edges
// between unrelated threads and hides exactly the races this harness is meant to find.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    lock();
    const unsigned g = gen_.load(std::memory_order_relaxed);
    if (++arrived_ == expected_) {
      complete();
      unlock();
      return;
    }
    unlock();
    while (gen_.load(std::memory_order_acquire) == g) {
#ifdef __linux__
      syscall(SYS_futex, reinterpret_cast<unsigned*>(&gen_), FUTEX_WAIT_PRIVATE, g, nullptr, nullptr, 0);
#else
      sched_yield();
#endif
    }
  }
  void arrive_and_drop() {
    lock();
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) complete();
    unlock();
  }

 private:
  void lock() {
    while (lock_.exchange(1, std::memory_order_acquire)) sched_yield();
  }
  void unlock() { lock_.store(0, std::memory_order_release); }
  void complete() {
    arrived_ = 0;
    gen_.fetch_add(1, std::memory_order_release);
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<unsigned*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#endif
  }
  std::atomic<int> lock_{0};
  int expected_;
  int arrived_ = 0;
  std::atomic<unsigned> gen_{0};
};

struct Simd {
  explicit Simd(int lanes) : bar(lanes) {
    for (int i = 0; i < 32; ++i) active[i] = i < lanes;
  }
  Barrier bar;
  alignas(16) unsigned char slots[32][16];
  std::atomic<bool> active[32];
};

struct Group {
  explicit Group(int n) : tg(n) {}
  Barrier tg;
  std::vector<std::unique_ptr<Simd>> simds;
};

struct Ctx {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
  Group* group;
};

inline thread_local Ctx* current = nullptr;

template <class T, class F> T simd_exchange(T v, F pick) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  Simd& s = *current->group->simds[current->simdgroup_index_in_threadgroup];
  const uint lane = current->thread_index_in_simdgroup;
  std::memcpy(s.slots[lane], &v, sizeof(T));
  s.bar.arrive_and_wait();
  auto get = [&](uint l) {
    T x;
    std::memcpy(&x, s.slots[l & 31u], sizeof(T));
    return x;
  };
  auto active = [&](uint l) { return l < 32 && s.active[l].load(); };
  T r = pick(get, active, lane);
  s.bar.arrive_and_wait();
  return r;
}

// Run `kernel(ctx)` for every thread of a dispatch_threads(grid, threadgroup) launch: threadgroups
// one after another, the threads of each concurrently. Edge threadgroups are partial (Metal's
// non-uniform threadgroups): only positions inside the grid run.
inline void launch(uint3 grid, uint3 tg, const std::function<void(Ctx&)>& kernel) {
  const uint3 groups{(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        const uint3 dims{std::min(tg.x, grid.x - gx * tg.x), std::min(tg.y, grid.y - gy * tg.y),
                         std::min(tg.z, grid.z - gz * tg.z)};
        const int n = int(dims.x * dims.y * dims.z);
        Group group(n);
        const int nsimd = (n + 31) / 32;
        for (int s = 0; s < nsimd; ++s) group.simds.push_back(std::make_unique<Simd>(std::min(32, n - 32 * s)));
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int i = 0; i < n; ++i) {
          threads.emplace_back([&, i] {
            Ctx c{};
            const uint lx = uint(i) % dims.x, ly = (uint(i) / dims.x) % dims.y, lz = uint(i) / (dims.x * dims.y);
            c.thread_position_in_threadgroup = {lx, ly, lz};
            c.threadgroup_position_in_grid = {gx, gy, gz};
            c.thread_position_in_grid = {gx * tg.x + lx, gy * tg.y + ly, gz * tg.z + lz};
            c.threads_per_threadgroup = dims;
            c.threadgroups_per_grid = groups;
            c.threads_per_grid = grid;
            c.thread_index_in_threadgroup = uint(i);
            c.thread_index_in_simdgroup = uint(i) % 32;
            c.simdgroup_index_in_threadgroup = uint(i) / 32;
            c.simdgroups_per_threadgroup = uint(nsimd);
            c.threads_per_simdgroup = 32;
            c.thread_execution_width = 32;
            c.group = &group;
            current = &c;
            kernel(c);
            Simd& s = *group.simds[i / 32];
            s.active[i % 32].store(false);
            s.bar.arrive_and_drop();
            group.tg.arrive_and_drop();
            current = nullptr;
          });
        }
        for (auto& t : threads) t.join();
      }
}

template <class T> std::vector<T> load(const std::string& path, size_t n) {
  std::vector<T> v(std::max<size_t>(n, 1));
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T)));
  return v;
}

template <class T> std::vector<T> poisoned(size_t n) {
  std::vector<T> v(std::max<size_t>(n, 1));
  if constexpr (std::is_same_v<T, bfloat16_t>) {
    for (auto& x : v) x.bits = 0x7fc0;
  } else if constexpr (std::is_floating_point_v<T> || std::is_same_v<T, half>) {
    for (auto& x : v) x = T(NAN);
  } else {
    for (auto& x : v) x = T(0x5a5a5a5a);
  }
  return v;
}

template <class T> void save(const std::string& path, const std::vector<T>& v, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(n * sizeof(T)));
}

}  // namespace msl

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags) { msl::current->group->tg.arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) {
  msl::Simd& s = *msl::current->group->simds[msl::current->simdgroup_index_in_threadgroup];
  s.bar.arrive_and_wait();
}
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline bool isfinite(float x) { return std::isfinite(x); }
namespace fast {
using metal::exp;
using metal::rsqrt;
}
namespace precise {
using metal::exp;
using metal::rsqrt;
}

template <class T> T simd_sum(T v) {
  return msl::simd_exchange(v, [](auto get, auto active, uint) {
    T s = T(0);
    for (uint l = 0; l < 32; ++l)
      if (active(l)) s += get(l);
    return s;
  });
}
template <class T> T simd_max(T v) {
  return msl::simd_exchange(v, [v](auto get, auto active, uint) {
    T s = v;
    for (uint l = 0; l < 32; ++l)
      if (active(l)) s = max(s, get(l));
    return s;
  });
}
template <class T> T simd_min(T v) {
  return msl::simd_exchange(v, [v](auto get, auto active, uint) {
    T s = v;
    for (uint l = 0; l < 32; ++l)
      if (active(l)) s = min(s, get(l));
    return s;
  });
}
template <class T> T simd_prefix_exclusive_sum(T v) {
  return msl::simd_exchange(v, [](auto get, auto active, uint lane) {
    T s = T(0);
    for (uint l = 0; l < lane; ++l)
      if (active(l)) s += get(l);
    return s;
  });
}
// Reading an inactive lane is undefined in Metal; the harness returns the caller's own value.
template <class T> T simd_shuffle(T v, ushort src) {
  return msl::simd_exchange(v, [v, src](auto get, auto active, uint) { return active(src) ? get(src) : v; });
}
template <class T> T simd_broadcast(T v, ushort src) { return simd_shuffle(v, src); }
template <class T> T simd_shuffle_xor(T v, ushort mask) {
  return msl::simd_exchange(v, [v, mask](auto get, auto active, uint lane) {
    const uint src = (lane ^ mask) & 31u;
    return active(src) ? get(src) : v;
  });
}
template <class T> T simd_shuffle_down(T v, ushort delta) {
  return msl::simd_exchange(v, [v, delta](auto get, auto active, uint lane) {
    const uint src = lane + delta;
    return active(src) ? get(src) : v;
  });
}
template <class T> T simd_shuffle_up(T v, ushort delta) {
  return msl::simd_exchange(v, [v, delta](auto get, auto active, uint lane) {
    return lane >= delta && active(lane - delta) ? get(lane - delta) : v;
  });
}
}  // namespace metal
using namespace metal;

// Address spaces: nothing on a CPU. (`threadgroup` declarations were rewritten to `static` by
// the driver generator before this point; any other use is a pointer qualifier.)
#define device
#define constant
#define thread
#define threadgroup
