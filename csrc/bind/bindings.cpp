// Python bindings for mlx_robust._core: conversions and calls only.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <chrono>

#include "attacks/pgd.h"
#include "bind/util.h"
#include "core/geometry.h"
#include "validate.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx_robust;

namespace {

// check_interrupt's hook: between compiled chunks, on the main thread (the only one Python runs
// signal handlers on), at most every kInterruptPeriod, take the GIL and run the pending handlers;
// whatever they raise (KeyboardInterrupt) propagates as nb::python_error. A chunk is at most
// `unroll` steps (10 only where a step takes < 2 ms), so Ctrl-C lands within a chunk's time.
// Measured cost (2-core CPU, PGD on a linear model, 3000 single-step chunks): 53.5 us a chunk
// with the check, 53-57 us without; unmeasurable.
unsigned long main_thread_ident = 0;
constexpr auto kInterruptPeriod = std::chrono::milliseconds(20);

void python_interrupt_check() {
  if (PyThread_get_thread_ident() != main_thread_ident) {
    return;
  }
  static thread_local std::chrono::steady_clock::time_point last{};
  auto now = std::chrono::steady_clock::now();
  if (now - last < kInterruptPeriod) {
    return;
  }
  last = now;
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  {
    nb::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() == 0) {
      return;
    }
    PyErr_Fetch(&type, &value, &traceback);
  }
  // Let the chunks already queued finish before the engine unwinds: on a GPU, freeing their
  // buffers while kernels still use them ended the process (exit status 4, measured on an H200).
  try {
    mx::synchronize();
  } catch (...) {
  }
  nb::gil_scoped_acquire gil;
  PyErr_Restore(type, value, traceback);
  throw nb::python_error();
}

void init_attack(nb::module_& m) {
  auto attack_engine = nb::class_<AttackEngine>(m, "AttackEngine",
      "Compiled gradient-attack loop for one model (see csrc/attack.h).")
      .def(nb::init<>())
      .def(
          "run",
          [](AttackEngine& self, nb::handle forward, const std::vector<mx::array>& params,
             const mx::array& x0, const mx::array& y, const mx::array& eps,
             const mx::array& step_size, const mx::array& lo, const mx::array& hi,
             int num_classes, const std::string& norm, const std::string& loss, int steps,
             int restarts, bool random_start, bool targeted, bool track_best, bool early_stop,
             int unroll, bool stochastic, int eot_samples, const mx::array& key,
             const std::optional<mx::array>& probs, const std::optional<mx::array>& rows) {
            require_callable(forward);
            AttackConfig cfg;
            cfg.norm = parse_norm(norm);
            cfg.loss = parse_loss(loss);
            cfg.steps = steps;
            cfg.restarts = restarts;
            cfg.random_start = random_start;
            cfg.targeted = targeted;
            cfg.track_best = track_best;
            cfg.early_stop = early_stop;
            cfg.unroll = unroll;
            cfg.stochastic = stochastic;
            cfg.eot_samples = eot_samples;
            auto fn = borrow_forward(forward);
            AttackOutput out = [&] {
              nb::gil_scoped_release nogil;
              return self.run(fn, params, x0, y, eps, step_size, lo, hi, num_classes, cfg, key, probs, rows);
            }();
            return nb::make_tuple(out.x_adv, out.success, out.loss, out.logits, out.norms);
          },
          "forward"_a, "params"_a, "x0"_a, "y"_a, "eps"_a, "step_size"_a, "lo"_a, "hi"_a,
          nb::kw_only(), "num_classes"_a, "norm"_a = "linf", "loss"_a = "ce", "steps"_a = 10,
          "restarts"_a = 1, "random_start"_a = true, "targeted"_a = false, "track_best"_a = true,
          "early_stop"_a = false, "unroll"_a = 0, "stochastic"_a = false, "eot_samples"_a = 1, "key"_a, "probs"_a = nb::none(),
          "rows"_a = nb::none(),
          "Run the attack; returns (x_adv, success, loss, logits, norms). `forward(params, x)` "
          "is called only while a step is traced; with stochastic=True the last element of "
          "`params` is per-row PRNG keys (N, 2) for the draw, derived from each row's global "
          "sample index `rows` (N,) (default 0..N-1). The engine's compiled steps belong to one model: "
          "use one engine per model.");
  bind_engine_common(attack_engine);

  m.def("row_keys", &row_keys, "draw_key"_a, "rows"_a,
        "Per-row PRNG keys (N, 2) from a key (2,) and global sample indices (N,): what a random "
        "model's forward receives in the attack engines.");
  m.def(
      "project",
      [](const mx::array& x, const mx::array& x0, const mx::array& eps, const mx::array& lo,
         const mx::array& hi, const std::string& norm) {
        return project(x, x0, eps, lo, hi, parse_norm(norm));
      },
      "x"_a, "x0"_a, "eps"_a, "lo"_a, "hi"_a, "norm"_a,
      "Project x onto the norm ball of per-sample radius eps (N,) around x0, then clip to [lo, hi].");
  m.def(
      "ascent_step",
      [](const mx::array& x, const mx::array& g, const mx::array& alpha, const std::string& norm) {
        return ascent_step(x, g, alpha, parse_norm(norm));
      },
      "x"_a, "grad"_a, "alpha"_a, "norm"_a,
      "x + alpha*sign(g) (linf) or x + alpha*g/||g||_2 (l2), alpha of shape (N,).");
  m.def(
      "random_start",
      [](const mx::array& x0, const mx::array& eps, const mx::array& lo, const mx::array& hi,
         const std::string& norm, const mx::array& key) {
        return random_start(x0, eps, lo, hi, parse_norm(norm), key);
      },
      "x0"_a, "eps"_a, "lo"_a, "hi"_a, "norm"_a, "key"_a,
      "Uniform random point in the norm ball around x0, clipped to [lo, hi].");
  m.def(
      "attack_objective",
      [](const mx::array& logits, const mx::array& y, const std::string& loss, bool targeted,
         const std::optional<mx::array>& probs) {
        if (logits.ndim() != 2 || y.ndim() != 1 || y.shape(0) != logits.shape(0)) {
          throw std::invalid_argument("[attack_objective] logits must be (N, C) and y (N,)");
        }
        check_labels(y, logits.shape(1), "attack_objective");
        return attack_objective(logits, y, parse_loss(loss), targeted, probs);
      },
      "logits"_a, "y"_a, "loss"_a = "ce", "targeted"_a = false, "probs"_a = nb::none(),
      "Per-sample objective the attack maximises.");
  m.def(
      "split_keys",
      [](const mx::array& key, int64_t num, int64_t begin, int64_t end) {
        return split_rows(host_key(key, "split_keys"), num, begin, end);
      },
      "key"_a, "num"_a, "begin"_a, "end"_a,
      "Rows [begin, end) of mx.random.split(key, num), computed on the host without the other rows "
      "(how the engines derive per-step keys; bit-identical).");
}

void init_validate(nb::module_& m) {
  nb::class_<ValidationReport>(m, "ValidationReport", "Per-sample result of validate_batch.")
      .def_ro("num_samples", &ValidationReport::num_samples)
      .def_ro("nonfinite", &ValidationReport::nonfinite, "NaN/Inf count per sample, (N,) int32.")
      .def_ro("out_of_range", &ValidationReport::out_of_range,
              "Finite values outside the bounds per sample, (N,) int32.")
      .def_ro("total_nonfinite", &ValidationReport::total_nonfinite)
      .def_ro("total_out_of_range", &ValidationReport::total_out_of_range)
      .def_ro("nonfinite_samples", &ValidationReport::nonfinite_samples,
              "First sample indices with NaN/Inf.")
      .def_ro("out_of_range_samples", &ValidationReport::out_of_range_samples,
              "First sample indices with out-of-range values.")
      .def_prop_ro("ok", &ValidationReport::ok);

  m.def(
      "check_batch_structure",
      [](const mx::array& x, const std::optional<std::vector<int>>& sample_shape,
         const std::string& name) { check_batch_structure(x, sample_shape, name); },
      "x"_a, "sample_shape"_a = nb::none(), "name"_a = "x",
      "Check rank, batch size, dtype and per-sample shape without reading data.");
  m.def(
      "validate_batch",
      [](const mx::array& x, const std::optional<std::vector<int>>& sample_shape,
         const mx::array& lo, const mx::array& hi, int max_indices, const std::string& name) {
        nb::gil_scoped_release nogil;
        CoreLock serial;
        return validate_batch(x, sample_shape, lo, hi, max_indices, name);
      },
      "x"_a, "sample_shape"_a = nb::none(), "lo"_a, "hi"_a, "max_indices"_a = 10, "name"_a = "x",
      "One fused pass: structure, NaN/Inf and out-of-range counts per sample.");
  nb::class_<PendingValidation>(m, "PendingValidation", "Counts of start_validation, queued, not yet read.")
      .def_ro("num_samples", &PendingValidation::num_samples);
  m.def(
      "start_validation",
      [](const mx::array& x, const std::optional<std::vector<int>>& sample_shape, const mx::array& lo,
         const mx::array& hi, const std::string& name) {
        nb::gil_scoped_release nogil;
        CoreLock serial;
        return start_validation(x, sample_shape, lo, hi, name);
      },
      "x"_a, "sample_shape"_a = nb::none(), "lo"_a, "hi"_a, "name"_a = "x",
      "validate_batch's first half: structure checked now, counts queued on the device.");
  m.def(
      "finish_validation",
      [](const PendingValidation& pending, int max_indices) {
        nb::gil_scoped_release nogil;
        CoreLock serial;
        return finish_validation(pending, max_indices);
      },
      "pending"_a, "max_indices"_a = 10, "validate_batch's second half: read the queued counts.");
}

void init_rewrite(nb::module_& m) {
  m.def("fast_pool_enabled", &fast_pool_enabled,
        "Whether the core rewrites window maxima (max pooling) in traced forwards.");
  m.def("set_fast_pool", &set_fast_pool, "enabled"_a,
        "Turn the exact max-pooling rewrite on or off (compiled functions are keyed on it).");
  m.def("last_rewrite_count", &last_rewrite_count,
        "Window maxima replaced in the last forward this thread traced (for tests).");
  m.def(
      "rewrite_window_max",
      [](const mx::array& out) {
        auto r = rewrite_window_max(out);
        return nb::make_tuple(r, last_rewrite_count());
      },
      "out"_a,
      "Rewrite the window maxima in the pending graph of `out`; returns (out or its replacement, "
      "number replaced). What the core does to every traced forward.");
}

} // namespace

// Defined in their own binding files (bind_*.cpp), one per submodule of the core.
void init_smoothing(nb::module_& m);
void init_suite(nb::module_& m);
void init_square(nb::module_& m);

NB_MODULE(_core, m) {
  m.doc() = "mlx-robust C++ core: compiled attack loop and input validation.";
  m.attr("mlx_version") = MLX_ROBUST_MLX_VERSION;
  init_rewrite(m);
  main_thread_ident = nb::cast<unsigned long>(
      nb::module_::import_("threading").attr("main_thread")().attr("ident"));
  set_interrupt_hook(&python_interrupt_check);
  nb::register_exception_translator(
      [](const std::exception_ptr& p, void*) {
        try {
          std::rethrow_exception(p);
        } catch (const DTypeError& e) {
          PyErr_SetString(PyExc_TypeError, e.what());
        }
      },
      nullptr);
  init_attack(m);
  init_validate(m);
  init_smoothing(m);
  init_suite(m);
  init_square(m);
}
