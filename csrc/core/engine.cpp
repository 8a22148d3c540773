#include "core/engine.h"

#include <chrono>
#include <stdexcept>

#include "mlx/compile_impl.h"

namespace mlx_robust {

std::mutex& core_mutex() {
  static std::mutex m;
  return m;
}

namespace {
// Core entry points this thread is inside (0 or 1: a second entry throws).
thread_local int core_depth = 0;
std::atomic<void (*)()> interrupt_hook{nullptr};
} // namespace

bool in_core() {
  return core_depth > 0;
}

CoreLock::CoreLock() {
  if (core_depth > 0) {
    // This thread holds core_mutex(): waiting for it would wait forever.
    throw std::runtime_error(
        "[mlx-robust] re-entrant call: the model's forward called into mlx-robust "
        "(validate/predict/attack/certify) while it was being traced; call it outside the model");
  }
  lock_ = std::unique_lock<std::mutex>(core_mutex());
  ++core_depth;
}

CoreLock::~CoreLock() {
  --core_depth;
}

void set_interrupt_hook(void (*hook)()) {
  interrupt_hook.store(hook);
}

void check_interrupt() {
  if (auto hook = interrupt_hook.load()) {
    hook();
  }
}

namespace {

// Threefry-2x32 with 20 rounds, as MLX's RandomBits (mlx/backend/cpu/threefry.cpp).
std::pair<uint32_t, uint32_t> threefry2x32(std::pair<uint32_t, uint32_t> key, std::pair<uint32_t, uint32_t> count) {
  static constexpr uint32_t rotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {key.first, key.second, key.first ^ key.second ^ 0x1BD11BDAu};
  count.first += ks[0];
  count.second += ks[1];
  for (int i = 0; i < 5; ++i) {
    for (auto r : rotations[i % 2]) {
      count.first += count.second;
      count.second = (count.second << r) | (count.second >> (32 - r));
      count.second ^= count.first;
    }
    count.first += ks[(i + 1) % 3];
    count.second += ks[(i + 2) % 3] + i + 1;
  }
  return count;
}

} // namespace

HostKey host_key(const mx::array& key, const char* tag) {
  if (key.ndim() != 1 || key.shape(0) != 2 || key.dtype() != mx::uint32) {
    throw std::invalid_argument(std::string("[") + tag + "] key must be a PRNG key of shape (2,) and dtype uint32, got " +
                                shape_string(key));
  }
  auto k = mx::contiguous(key);
  mx::eval(k);
  auto p = k.data<uint32_t>();
  return {p[0], p[1]};
}

HostKey split_key(HostKey key, int64_t num, int64_t row) {
  if (num < 1 || num > (int64_t{1} << 31) || row < 0 || row >= num) {
    throw std::invalid_argument("[attack] split_key needs 0 <= row < num <= 2**31, got row " + std::to_string(row) +
                                " of " + std::to_string(num));
  }
  // split(key, num) is bits({num, 2}) of one key: 2 num words, word c and word c + num being the
  // two halves of threefry(key, (c, c + num)) for c < num.
  const uint32_t half = static_cast<uint32_t>(num);
  auto word = [&](int64_t p) {
    if (p < num) {
      return threefry2x32(key, {static_cast<uint32_t>(p), static_cast<uint32_t>(p) + half}).first;
    }
    auto c = static_cast<uint32_t>(p - num);
    return threefry2x32(key, {c, c + half}).second;
  };
  return {word(2 * row), word(2 * row + 1)};
}

mx::array split_rows(HostKey key, int64_t num, int64_t begin, int64_t end) {
  if (end < begin) {
    throw std::invalid_argument("[attack] split_rows needs begin <= end");
  }
  std::vector<uint32_t> out;
  out.reserve(static_cast<size_t>(end - begin) * 2);
  for (int64_t r = begin; r < end; ++r) {
    auto k = split_key(key, num, r);
    out.push_back(k.first);
    out.push_back(k.second);
  }
  return mx::array(out.begin(), {static_cast<int>(end - begin), 2}, mx::uint32);
}

mx::array key_array(HostKey key) {
  uint32_t w[2] = {key.first, key.second};
  return mx::array(w, {2}, mx::uint32);
}

namespace {
std::mutex released_mutex;
std::vector<std::uintptr_t> released_ids;
} // namespace

int UnrollCache::get(const mx::Shape& shape) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = by_shape_.find(std::vector<int>(shape.begin(), shape.end()));
  return it == by_shape_.end() ? 0 : it->second;
}

int UnrollCache::choose(const mx::Shape& shape, double step_ms) {
  int k = step_ms < 2.0 ? 10 : (step_ms < 6.0 ? 4 : 1);
  std::lock_guard<std::mutex> lock(mutex_);
  by_shape_[std::vector<int>(shape.begin(), shape.end())] = k;
  return k;
}

int UnrollCache::measure(const mx::Shape& shape, int steps, int& done, const std::function<void()>& run_step) {
  run_step();
  done = 1;
  if (done >= steps) {
    return 1;
  }
  auto t0 = std::chrono::steady_clock::now();
  run_step();
  done = 2;
  return choose(shape, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

void UnrollCache::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  by_shape_.clear();
}

CompiledEngine::StepFn CompiledEngine::compile_step(int kind, int k, const std::vector<uint64_t>& settings,
                                                    StepFn fn) {
  std::vector<uint64_t> constants{tag_, static_cast<uint64_t>(kind), static_cast<uint64_t>(k)};
  constants.insert(constants.end(), settings.begin(), settings.end());
  constants.push_back(static_cast<uint64_t>(fast_pool_enabled()));
  auto counted = [this, fn = std::move(fn)](const std::vector<mx::array>& in) {
    traces_++;
    return fn(in);
  };
  return mx::detail::compile(counted, id(kind), false, constants);
}

ChunkedLoop::ChunkedLoop(UnrollCache& cache, const mx::Shape& shape, int steps, int unroll)
    : cache_(cache), shape_(shape), steps_(steps), unroll_(unroll > 0 ? unroll : cache.get(shape)) {}

void ChunkedLoop::run(int& done, std::vector<mx::array>& state, int flag,
                      const std::function<std::vector<mx::array>(int)>& chunk,
                      const std::function<bool(const mx::array&)>& between) {
  auto queue = [&](int k) {
    check_interrupt();
    state = chunk(k);
    mx::async_eval(state);
  };
  if (unroll_ == 0) {
    // Unroll deep only where steps are cheap (host-bound): unrolling slows compute-bound models.
    unroll_ = cache_.measure(shape_, steps_, done, [&] {
      queue(1);
      mx::eval(state);
    });
  }
  while (done < steps_) {
    int k = steps_ - done >= unroll_ ? unroll_ : 1;
    auto flags = state[flag];
    queue(k);
    done += k;
    if (done < steps_ && !between(flags)) {
      break;
    }
  }
}

std::vector<mx::array> chunk_inputs(const std::vector<mx::array>& state, const std::vector<mx::array>& fixed, int t0,
                                    const std::vector<mx::array>& params) {
  std::vector<mx::array> in(state);
  in.insert(in.end(), fixed.begin(), fixed.end());
  in.push_back(mx::array(t0, mx::int32));
  in.insert(in.end(), params.begin(), params.end());
  return in;
}

void erase_compiled(const std::vector<std::uintptr_t>& ids) {
  auto cache = mx::detail::compile_cache();
  for (auto id : ids) {
    mx::detail::compile_erase(cache, id);
  }
}

void release_compiled(const std::vector<std::uintptr_t>& ids) {
  // Inside the core this thread holds the lock already (try_lock would be undefined): defer.
  if (!in_core()) {
    std::unique_lock<std::mutex> serial(core_mutex(), std::try_to_lock);
    if (serial.owns_lock()) {
      erase_compiled(ids);
      return;
    }
  }
  std::lock_guard<std::mutex> lock(released_mutex);
  released_ids.insert(released_ids.end(), ids.begin(), ids.end());
}

void drain_released() {
  std::vector<std::uintptr_t> ids;
  {
    std::lock_guard<std::mutex> lock(released_mutex);
    ids.swap(released_ids);
  }
  erase_compiled(ids);
}
int next_pow2(int n) {
  int p = 1;
  while (p < n) {
    p <<= 1;
  }
  return p;
}
} // namespace mlx_robust
