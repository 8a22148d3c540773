// The compiled multi-step attack loop shared by every gradient attack (FGSM, PGD, ...).
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "graph_rewrite.h"
#include "mlx/mlx.h"
#include "project.h"

namespace mlx_robust {

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
 * them: id(0), id(1), ...), a trace counter and an unroll cache. Not copyable: the ids are the
 * object's address. The destructor hands the ids to release_compiled.
 */
class CompiledEngine {
 public:
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
  explicit CompiledEngine(int num_ids) : num_ids_(num_ids) {}
  ~CompiledEngine() {
    release_compiled(ids());
  }

  std::uintptr_t id(int k) const {
    return reinterpret_cast<std::uintptr_t>(this) + k;
  }

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

  int num_ids_;
};

/** The model as a pure function of its flattened parameters and an input batch -> logits (N, C). */
using ForwardFn = std::function<mx::array(const std::vector<mx::array>&, const mx::array&)>;

enum class LossKind : int { CrossEntropy = 0, Margin = 1, KL = 2 };

/** "(64, 8, 8, 1)" / "(64,)": a shape for error messages, built without std::ostringstream
    (a message built with one crashed an in-place g++ 13 build against the mlx-cuda wheel). */
std::string shape_string(const mx::array& a);

/**
 * forward(params, x) checked to be floating logits of shape (N, num_classes), returned as float32;
 * otherwise std::invalid_argument("[<where>] model output must have shape ...").
 */
mx::array checked_logits(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    int num_classes,
    const char* where = "attack");

/** Per-sample objective computed from logits (N, C) -> (N,). */
using ObjectiveFn = std::function<mx::array(const mx::array&)>;

struct Scored {
  mx::array objective;  // (N,) mean over the draws
  mx::array logits;     // (N, C) mean over the draws
};

/**
 * Per-row draw keys (N, 2) uint32 for a stochastic model: row i's key depends only on `draw_key`
 * (2,) and rows[i], the sample's global index (N,), so its draw is the same whatever batch, working
 * batch or position it is evaluated in. A random defence draws row i from key i
 * (``GaussianNoise.apply`` with an (N, 2) key).
 */
mx::array row_keys(const mx::array& draw_key, const mx::array& rows);

/**
 * Global sample indices (N,) uint32 for an engine: `rows` if given (checked: shape (N,), integer),
 * else 0..N-1. Throws std::invalid_argument("[<where>] rows must ...").
 */
mx::array sample_rows(const std::optional<mx::array>& rows, int n, const char* where);

/**
 * Score x once (deterministic model) or as the mean over `eot_samples` draws of a stochastic
 * model (EOT, Athalye et al. 2018), whose trailing parameter is row_keys(k_e, rows) for keys k_e
 * split from `draw_key`: every sample's draws depend only on `draw_key` and its global index.
 * `where` names the attack in error messages. Every gradient engine scores through this.
 */
Scored score(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    int num_classes,
    bool stochastic,
    int eot_samples,
    const mx::array& draw_key,
    const mx::array& rows,
    const ObjectiveFn& objective,
    const char* where);

/** Smallest power of two >= n (shrinking working batches retrace at most log2(N) times). */
int next_pow2(int n);

/**
 * Check that every label in `y` (N,) lies in [0, num_classes): an out-of-range label would make
 * the gather in the loss, and the scatter in its gradient, touch memory outside the logits.
 * Evaluates `y` (one small host sync). Throws std::invalid_argument("[<where>] ...").
 */
void check_labels(const mx::array& y, int num_classes, const char* where = "attack", const char* name = "y");

/**
 * The inputs of an attack engine's run that check_attack_inputs checks. Optional members (null)
 * are not checked; `target` and `probs` only where the engine uses them.
 */
struct AttackInputs {
  AttackInputs(const mx::array& x_, const mx::array& y_, int num_classes_, const mx::array& lo_,
               const mx::array& hi_, const mx::array* eps_ = nullptr)
      : x(&x_), y(&y_), num_classes(num_classes_), lo(&lo_), hi(&hi_), eps(eps_) {}

  const mx::array* x = nullptr;          // floating, rank >= 2, N >= 1
  const mx::array* y = nullptr;          // (N,) integer labels in [0, num_classes)
  int num_classes = 0;                   // >= 2
  const mx::array* lo = nullptr;         // finite, lo <= hi, broadcastable to x
  const mx::array* hi = nullptr;
  const mx::array* eps = nullptr;        // (N,) finite, >= 0
  const mx::array* step_size = nullptr;  // (N,) finite, >= 0
  const mx::array* target = nullptr;     // (N,) integer targets in [0, num_classes)
  const mx::array* probs = nullptr;      // (N, C) finite, >= 0, rows summing to 1 (+-1e-3)
  const char* y_name = "y";              // what y is called in messages ("y" or "targets")
};

/**
 * What check_attack_inputs could not check without reading the data: small arrays (label ranges,
 * counts of bad values) that `verify` evaluates (unless already evaluated) and turns into
 * std::invalid_argument. Evaluate them with the result to avoid a host round trip.
 */
class PendingInputChecks {
 public:
  PendingInputChecks(std::string tag, std::vector<std::string> what, mx::array facts, mx::array ranges);
  /** The arrays to evaluate (with other work, or by verify). */
  std::vector<mx::array> arrays() const {
    return {facts_, ranges_};
  }
  /** Evaluate (if needed) and throw std::invalid_argument("[tag] ...") on the first bad value. */
  void verify() const;

 private:
  std::string tag_;
  std::vector<std::string> what_;
  mx::array facts_;   // float32: per check, count of bad values then an example bad value
  mx::array ranges_;  // int64: min and max of y, then of target
};

/**
 * The one input check every attack engine (PGD, APGD, C&W, Square) runs, whatever its caller
 * checked: shapes and dtypes now (throws std::invalid_argument("[tag] ...")), and the values
 * (labels and targets in [0, num_classes), finite bounds with lo <= hi, finite eps >= 0, KL
 * probabilities) as a PendingInputChecks. Until verify() passed, an engine must only use labels
 * clipped into range (no gather may read outside the logits).
 */
PendingInputChecks check_attack_inputs(const char* tag, const AttackInputs& in);

/**
 * For the loss helpers called directly (dlr_loss, cw_margin_loss): logits (N, C) floating with
 * C >= min_classes, y (and target, if given) (N,) integers in [0, C). Evaluates the labels.
 */
void check_loss_inputs(const char* tag, const mx::array& logits, const mx::array& y,
                       const std::optional<mx::array>& target, int min_classes);

/** Parse "ce" / "margin" / "kl"; throws on anything else. */
LossKind parse_loss(const std::string& loss);

/**
 * Per-sample attack objective, to be maximised. Untargeted: CE(z, y) or max_{j!=y} z_j - z_y.
 * Targeted (y holds the targets): -CE(z, y) or z_y - max_{j!=y} z_j.
 * KL (TRADES, Zhang et al. 2019): KL(p || softmax(z)) with `probs` = p (N, C), the clean
 * prediction; `targeted` negates it.
 */
mx::array attack_objective(
    const mx::array& logits,
    const mx::array& y,
    LossKind loss,
    bool targeted,
    const std::optional<mx::array>& probs = std::nullopt,
    const std::optional<mx::array>& is_y = std::nullopt);

/** (N, C) bool: column y_i of row i. Pass it to attack_objective as `is_y` to build it once for
    several objectives (a compiled loop builds it once per call instead of once per step). */
mx::array class_mask(const mx::array& y, int num_classes);

/** Per-sample success: argmax != y (untargeted) or argmax == y (targeted). */
mx::array attack_success(const mx::array& logits, const mx::array& y, bool targeted);

struct AttackConfig {
  Norm norm = Norm::Linf;
  LossKind loss = LossKind::CrossEntropy;
  int steps = 10;
  int restarts = 1;
  bool random_start = true;
  bool targeted = false;
  /** Keep, per sample, the first successful iterate of a restart, else its last iterate; across
      restarts, the first success, else the highest objective (without early stop, a deterministic
      model's sample simply stops moving at its first success and is scored at the end).
      false: the last iterate of the last restart (adversarial training). */
  bool track_best = true;
  /** Drop succeeded samples from the active batch (requires track_best; results unchanged). */
  bool early_stop = false;
  /** Steps per compiled call; 0 picks it by timing one step per input shape. */
  int unroll = 0;
  /** The model is random: `forward` receives one extra trailing parameter, per-row PRNG keys
      (N, 2) for the draw (row_keys), and every score averages `eot_samples` draws (Expectation
      over Transformation). */
  bool stochastic = false;
  int eot_samples = 1;
};

struct AttackOutput {
  mx::array x_adv;
  mx::array success;
  mx::array loss;
  mx::array logits;
  mx::array norms;
};

/**
 * Owns the compiled step functions of one model. Every gradient attack runs through `run`:
 *
 *   for each restart r (key r of split(key, restarts)):
 *     x = random_start(x0) or x0
 *     repeat `steps` times: g = d objective(f(x)) / dx; keep best; x = project(ascent_step(x, g))
 *     evaluate f at the last x; keep best
 *
 * The step is traced once per input shape and configuration and compiled with `unroll` steps per
 * call; model parameters are inputs of the compiled function, never captured constants.
 */
class AttackEngine : public CompiledEngine {
  // run(): `probs` (N, num_classes) is required by the KL objective and ignored otherwise.
 public:
  AttackEngine() : CompiledEngine(2) {}

  AttackOutput run(
      const ForwardFn& forward,
      const std::vector<mx::array>& params,
      const mx::array& x0,
      const mx::array& y,
      const mx::array& eps,
      const mx::array& step_size,
      const mx::array& lo,
      const mx::array& hi,
      int num_classes,
      const AttackConfig& config,
      const mx::array& key,
      const std::optional<mx::array>& probs = std::nullopt,
      const std::optional<mx::array>& rows = std::nullopt);

 private:
  std::uintptr_t step_id() const {
    return id(0);
  }
  std::uintptr_t eval_id() const {
    return id(1);
  }
};

} // namespace mlx_robust
