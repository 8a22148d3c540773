// What every compiled engine shares: the core lock, interrupts, PRNG keys on the host, compile-cache
// ids and their release, the unroll cache.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/graph_rewrite.h"
#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/**
 * Serialises every core entry point that builds or evaluates MLX graphs with the GIL released
 * (MLX's compile cache and graph evaluation are not safe to drive from two threads at once).
 * Take it only after releasing the GIL: a traced forward re-acquires the GIL while holding it.
 */
std::mutex& core_mutex();

/** Whether this thread is inside a core entry point (holds core_mutex() through a CoreLock). */
bool in_core();

/**
 * The core lock of one entry point (an engine's run, vote counting, validation, clear): holds
 * core_mutex() and marks this thread as inside the core. Entered again from the same thread (a
 * model's forward, traced with the lock held, calling into mlx-robust) it throws
 * std::runtime_error instead of deadlocking; other threads simply wait. Take it after releasing
 * the GIL.
 */
class CoreLock {
 public:
  CoreLock();
  ~CoreLock();
  CoreLock(const CoreLock&) = delete;
  CoreLock& operator=(const CoreLock&) = delete;

 private:
  std::unique_lock<std::mutex> lock_;
};

/**
 * Between compiled chunks of every long loop (engines' steps, smoothing's votes): let a pending
 * interrupt (Ctrl-C) through. Calls the hook the bindings installed (which briefly takes the GIL
 * and runs Python's signal handlers, throwing what they raise); a no-op without one.
 */
void check_interrupt();

/** Install check_interrupt's hook (the bindings do, at import). */
void set_interrupt_hook(void (*hook)());

/** A PRNG key's two words, on the host. */
using HostKey = std::pair<uint32_t, uint32_t>;

/** The words of a PRNG key (2,) uint32 (evaluated here); throws std::invalid_argument("[tag] ...")
    for anything else. */
HostKey host_key(const mx::array& key, const char* tag = "attack");

/**
 * Row `row` of mx::random::split(key, num), computed on the host (Threefry-2x32, as MLX's
 * RandomBits) without the other rows: per-step keys of a long loop then cost memory per chunk,
 * not per step. Bit-identical to mx::random::split(key, num)[row]. 1 <= num <= 2**31.
 */
HostKey split_key(HostKey key, int64_t num, int64_t row);

/** Rows [begin, end) of mx::random::split(key, num) as a materialised (end - begin, 2) uint32
    array (split_key per row). */
mx::array split_rows(HostKey key, int64_t num, int64_t begin, int64_t end);

/** A materialised (2,) uint32 key array. */
mx::array key_array(HostKey key);

/** Erase compiled-function ids from the compile cache now; call with core_mutex() held. */
void erase_compiled(const std::vector<std::uintptr_t>& ids);

/**
 * For engine destructors: erase `ids` now if core_mutex() is free, else defer them to the next
 * core run (a destructor must not wait for a thread tracing a model, which may be waiting for the
 * GIL that the destructor's caller holds).
 */
void release_compiled(const std::vector<std::uintptr_t>& ids);

/** Erase the ids deferred by release_compiled; call with core_mutex() held, before compiling. */
void drain_released();

/**
 * Steps per compiled call, chosen once per input shape from the measured time of one compiled
 * step (thread-safe). Deep unrolling only where steps are cheap (host-bound), since unrolling slows
 * compute-bound models (ARCHITECTURE §2). Every engine keeps one.
 */
class UnrollCache {
 public:
  /** The depth chosen for `shape`, or 0 if none yet. */
  int get(const mx::Shape& shape) const;
  /** Choose (and remember) the depth for `shape` from one step's wall time in milliseconds. */
  int choose(const mx::Shape& shape, double step_ms);
  /**
   * First call for `shape` of a loop of `steps` steps: run one step (it traces and compiles), then
   * time a second and choose from it. `run_step` runs and evaluates one step; `done` is set to the
   * steps run. Returns the depth (1 when the loop has a single step).
   */
  int measure(const mx::Shape& shape, int steps, int& done, const std::function<void()>& run_step);
  void clear();

 private:
  mutable std::mutex mutex_;
  std::map<std::vector<int>, int> by_shape_;
};

/**
 * What every compiled engine shares: compile-cache ids derived from its address (`num_ids` of
 * them: id(0), id(1), ...), a tag that keeps its cache entries apart from another engine's at the
 * same address, a trace counter and an unroll cache. Not copyable: the ids are the object's
 * address. The destructor hands the ids to release_compiled.
 */
class CompiledEngine {
 public:
  /** A function as MLX compiles it: arrays in, arrays out. */
  using StepFn = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;

  CompiledEngine(const CompiledEngine&) = delete;
  CompiledEngine& operator=(const CompiledEngine&) = delete;

  /** How many times the model function was traced (Python ran) since construction. */
  int trace_count() const {
    return traces_.load();
  }

  /** Steps per compiled call chosen for inputs of this shape, or 0 if none chosen yet. */
  int chosen_unroll(const mx::Shape& shape) const {
    return unrolls_.get(shape);
  }

  /** Drop every compiled function of this engine (after the model's structure changed).
      Call with core_mutex() held or while no other thread runs the core. */
  void clear() {
    erase_compiled(ids());
    unrolls_.clear();
  }

  /** clear() for a caller that cannot take the core lock (this thread is inside the core): the
      compiled functions are erased at the next core run (release_compiled). */
  void clear_later() {
    release_compiled(ids());
    unrolls_.clear();
  }

 protected:
  /** `tag`: the engine's own word ("PGD", "APGD", ...) in every compile key; `num_ids`: kinds of
      compiled function (compile_step's `kind` < num_ids). */
  CompiledEngine(uint64_t tag, int num_ids) : tag_(tag), num_ids_(num_ids) {}
  ~CompiledEngine() {
    release_compiled(ids());
  }

  std::uintptr_t id(int k) const {
    return reinterpret_cast<std::uintptr_t>(this) + k;
  }

  /**
   * `fn` compiled (not shapeless) under id(kind) and the key (engine tag, kind, k, settings..., fast
   * pooling on): the model is tied to this engine's ids, the configuration is part of the key. Every
   * trace counts in trace_count().
   */
  StepFn compile_step(int kind, int k, const std::vector<uint64_t>& settings, StepFn fn);

  std::atomic<int> traces_{0};
  UnrollCache unrolls_;

 private:
  std::vector<std::uintptr_t> ids() const {
    std::vector<std::uintptr_t> out;
    for (int k = 0; k < num_ids_; ++k) {
      out.push_back(id(k));
    }
    return out;
  }

  uint64_t tag_;
  int num_ids_;
};

/**
 * The step loop of every engine: steps [done, steps) as compiled chunks of `unroll` steps, the
 * remainder one step at a time (two step functions per shape, whatever the step count). With
 * unroll 0 and no depth chosen yet for `shape`, the first run traces one step and times a second
 * (UnrollCache::measure). Before each chunk check_interrupt() lets Ctrl-C through.
 */
class ChunkedLoop {
 public:
  /** `unroll`: the caller's setting (0: the cache's choice for `shape`, or measure it). */
  ChunkedLoop(UnrollCache& cache, const mx::Shape& shape, int steps, int unroll);

  /**
   * From `done` to the last step: `chunk(k)` returns the state after k steps from `done` (built
   * from `state`), which the loop queues (async_eval). After a chunk that leaves steps to run,
   * `between(flags)` gets the state's slot `flag` as it was before that chunk (known one chunk ago:
   * reading it does not wait for the queued chunk) and may stop the loop by returning false.
   */
  void run(int& done, std::vector<mx::array>& state, int flag,
           const std::function<std::vector<mx::array>(int)>& chunk,
           const std::function<bool(const mx::array&)>& between);

 private:
  UnrollCache& cache_;
  mx::Shape shape_;
  int steps_;
  int unroll_;
};

/** A chunk's inputs, in the order every engine's step function reads them: the per-sample
    `state`, the `fixed` inputs, the index `t0` of the chunk's first step, the model's `params`. */
std::vector<mx::array> chunk_inputs(const std::vector<mx::array>& state, const std::vector<mx::array>& fixed, int t0,
                                    const std::vector<mx::array>& params);

/** Smallest power of two >= n (shrinking working batches retrace at most log2(N) times). */
int next_pow2(int n);

} // namespace mlx_robust
