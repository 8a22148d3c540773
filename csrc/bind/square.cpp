// Python bindings for the Square attack (score-based, black-box).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bind/util.h"
#include "attacks/square.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx_robust;

void init_square(nb::module_& m) {
  auto square_engine = nb::class_<SquareEngine>(m, "SquareEngine",
      "Compiled Square attack (Andriushchenko et al. 2020) for one model (see csrc/square.h).")
      .def(nb::init<>())
      .def(
          "run",
          [](SquareEngine& self, nb::handle forward, const std::vector<mx::array>& params,
             const mx::array& x0, const mx::array& y, const mx::array& eps, const mx::array& lo,
             const mx::array& hi, int num_classes, const std::string& norm, const std::string& loss,
             int n_queries, double p_init, bool targeted, bool early_stop, int unroll,
             bool stochastic, const mx::array& key, const std::optional<mx::array>& rows) {
            require_callable(forward, "square");
            SquareConfig cfg;
            cfg.norm = parse_norm(norm, "square");
            cfg.loss = parse_loss(loss);
            cfg.n_queries = n_queries;
            cfg.p_init = p_init;
            cfg.targeted = targeted;
            cfg.early_stop = early_stop;
            cfg.unroll = unroll;
            cfg.stochastic = stochastic;
            auto fn = borrow_forward(forward, "square");
            SquareOutput out = [&] {
              nb::gil_scoped_release nogil;
              return self.run(fn, params, x0, y, eps, lo, hi, num_classes, cfg, key, rows);
            }();
            return nb::make_tuple(out.x_adv, out.success, out.loss, out.logits, out.norms, out.queries);
          },
          "forward"_a, "params"_a, "x0"_a, "y"_a, "eps"_a, "lo"_a, "hi"_a, nb::kw_only(),
          "num_classes"_a, "norm"_a = "linf", "loss"_a = "margin", "n_queries"_a = 1000,
          "p_init"_a = 0.8, "targeted"_a = false, "early_stop"_a = true, "unroll"_a = 0,
          "stochastic"_a = false, "key"_a, "rows"_a = nb::none(),
          "Run the Square attack on NHWC images; returns (x_adv, success, loss, logits, norms, "
          "queries). `forward(params, x)` is called only while tracing; with stochastic=True the "
          "last element of `params` is per-row PRNG keys (N, 2) for the draw, from the global "
          "sample indices `rows` (N,) (default 0..N-1). One engine per model.");
  bind_engine_common(square_engine);

  m.def("square_level", &square_level, "it"_a, "n_queries"_a,
        "Halvings of p_init at iteration `it` of `n_queries` (the paper's schedule), 0..9.");
  m.def(
      "square_window_size",
      [](double p, int h, int w, int c, const std::string& norm) {
        return square_window_size(p, h, w, c, parse_norm(norm, "square"));
      },
      "p"_a, "h"_a, "w"_a, "c"_a, "norm"_a, "Side of the square window for pixel fraction p.");
  m.def("square_pattern", &square_pattern, "s"_a, "transpose"_a = false,
        "The L2 update's s x s centre-weighted pattern (row-major list of s*s floats).");
  m.def("square_sample_ids", &sample_ids, "x"_a,
        "Per-sample uint32 content ids (N,) that key the Square attack's draws.");
  m.def("square_draws", &square_draws, "ids"_a, "key"_a, "m"_a,
        "Per-sample random words (N, m) uint32 from ids (N,) and a PRNG key.");
}
