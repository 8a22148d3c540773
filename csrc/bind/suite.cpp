// Python bindings for the attack suite beyond PGD: APGD, Carlini-Wagner, Square.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cmath>

#include "attacks/apgd.h"
#include "bind/util.h"
#include "attacks/pgd.h"
#include "attacks/cw.h"
#include "core/geometry.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx_robust;

namespace {

nb::tuple as_tuple(const AttackOutput& out) {
  return nb::make_tuple(out.x_adv, out.success, out.loss, out.logits, out.norms);
}

} // namespace

void init_suite(nb::module_& m) {
  auto apgd_engine = nb::class_<ApgdEngine>(m, "ApgdEngine",
      "Compiled Auto-PGD loop for one model (Croce & Hein 2020; see csrc/apgd.h).")
      .def(nb::init<>())
      .def(
          "run",
          [](ApgdEngine& self, nb::handle forward, const std::vector<mx::array>& params,
             const mx::array& x0, const mx::array& y, const mx::array& eps, const mx::array& lo,
             const mx::array& hi, int num_classes, const std::string& norm, const std::string& loss,
             int steps, int restarts, int n_target_classes, const std::optional<mx::array>& target,
             float rho, bool early_stop, int unroll, bool stochastic, int eot_samples,
             const mx::array& key, const std::optional<mx::array>& rows) {
            require_callable(forward, "apgd");
            ApgdConfig cfg;
            cfg.norm = parse_norm(norm, "apgd");
            cfg.loss = parse_apgd_loss(loss);
            cfg.steps = steps;
            cfg.restarts = restarts;
            cfg.n_target_classes = n_target_classes;
            cfg.targeted = target.has_value();
            cfg.rho = rho;
            cfg.early_stop = early_stop;
            cfg.unroll = unroll;
            cfg.stochastic = stochastic;
            cfg.eot_samples = eot_samples;
            auto fn = borrow_forward(forward, "apgd");
            AttackOutput out = [&] {
              nb::gil_scoped_release nogil;
              return self.run(fn, params, x0, y, target, eps, lo, hi, num_classes, cfg, key, rows);
            }();
            return as_tuple(out);
          },
          "forward"_a, "params"_a, "x0"_a, "y"_a, "eps"_a, "lo"_a, "hi"_a, nb::kw_only(),
          "num_classes"_a, "norm"_a = "linf", "loss"_a = "ce", "steps"_a = 100, "restarts"_a = 1,
          "n_target_classes"_a = 0, "target"_a = nb::none(), "rho"_a = 0.75f, "early_stop"_a = true,
          "unroll"_a = 0, "stochastic"_a = false, "eot_samples"_a = 1, "key"_a, "rows"_a = nb::none(),
          "Run APGD; returns (x_adv, success, loss, logits, norms). `y` are the true labels; "
          "`target` (N,) makes it targeted (success = argmax == target); n_target_classes > 0 is "
          "APGD-T (targeted DLR towards the top-k other classes, success = argmax != y). "
          "`forward(params, x)` is called only while tracing; with stochastic=True the last "
          "element of `params` is per-row PRNG keys (N, 2) for the draw, from the global sample "
          "indices `rows` (N,) (default 0..N-1). One engine per model.");
  bind_engine_common(apgd_engine);

  auto cw_engine = nb::class_<CwEngine>(m, "CwEngine",
      "Compiled Carlini-Wagner L2 loop for one model (Carlini & Wagner 2017; see csrc/cw.h).")
      .def(nb::init<>())
      .def(
          "run",
          [](CwEngine& self, nb::handle forward, const std::vector<mx::array>& params,
             const mx::array& x0, const mx::array& y, const mx::array& lo, const mx::array& hi,
             int num_classes, bool targeted, float c, float kappa, int steps, float lr,
             int binary_search_steps, bool early_abort, int unroll, bool stochastic, int eot_samples,
             const mx::array& key, const std::optional<mx::array>& rows) {
            require_callable(forward, "cw");
            CwConfig cfg;
            cfg.targeted = targeted;
            cfg.initial_const = c;
            cfg.kappa = kappa;
            cfg.steps = steps;
            cfg.lr = lr;
            cfg.binary_search_steps = binary_search_steps;
            cfg.early_abort = early_abort;
            cfg.unroll = unroll;
            cfg.stochastic = stochastic;
            cfg.eot_samples = eot_samples;
            auto fn = borrow_forward(forward, "cw");
            AttackOutput out = [&] {
              nb::gil_scoped_release nogil;
              return self.run(fn, params, x0, y, lo, hi, num_classes, cfg, key, rows);
            }();
            return as_tuple(out);
          },
          "forward"_a, "params"_a, "x0"_a, "y"_a, "lo"_a, "hi"_a, nb::kw_only(), "num_classes"_a,
          "targeted"_a = false, "c"_a = 1.0f, "kappa"_a = 0.0f, "steps"_a = 100, "lr"_a = 0.01f,
          "binary_search_steps"_a = 5, "early_abort"_a = true, "unroll"_a = 0, "stochastic"_a = false,
          "eot_samples"_a = 1, "key"_a, "rows"_a = nb::none(),
          "Run C&W L2; returns (x_adv, success, loss, logits, norms) with L2 norms and loss the "
          "logit margin at x_adv. With targeted=True, `y` holds the targets. `forward(params, x)` "
          "is called only while tracing. One engine per model.");
  bind_engine_common(cw_engine);

  m.def(
      "dlr_loss",
      [](const mx::array& logits, const mx::array& y, const std::optional<mx::array>& target) {
        check_loss_inputs("dlr_loss", logits, y, target, 2);  // the loss names its own class minimum
        return target ? dlr_loss_targeted(logits, y, *target) : dlr_loss(logits, y);
      },
      "logits"_a, "y"_a, "target"_a = nb::none(),
      "Per-sample DLR loss of Croce & Hein (2020), to maximise; with `target`, the targeted DLR.");
  m.def(
      "cw_margin_loss",
      [](const mx::array& logits, const mx::array& y, float kappa, bool targeted) {
        check_loss_inputs("cw_margin_loss", logits, y, std::nullopt, 2);
        if (!std::isfinite(kappa) || kappa < 0.0f) {
          throw std::invalid_argument("[cw_margin_loss] kappa must be a finite number >= 0, got " +
                                      std::to_string(kappa));
        }
        return cw_margin_loss(logits, y, kappa, targeted);
      },
      "logits"_a, "y"_a, "kappa"_a = 0.0f, "targeted"_a = false,
      "Per-sample Carlini-Wagner margin loss max(Z_y - max_{j!=y} Z_j, -kappa), to minimise "
      "(targeted: max(max_{j!=t} Z_j - Z_t, -kappa)).");
  m.def(
      "apgd_checkpoints", &apgd_checkpoints, "steps"_a,
      "Iterations after which APGD may halve its step size (Croce & Hein 2020, §3.1).");
}
