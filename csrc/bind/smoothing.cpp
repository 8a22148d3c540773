// Python bindings for randomized smoothing and certification statistics: conversions and calls only.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bind/util.h"
#include "defences/smoothing.h"
#include "defences/stats.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx_robust;

void init_smoothing(nb::module_& m) {
  auto smoothing_engine = nb::class_<SmoothingEngine>(m, "SmoothingEngine",
      "Compiled Gaussian sampling and vote counting for one model (see csrc/smoothing.h).")
      .def(nb::init<>())
      .def(
          "vote_counts",
          [](SmoothingEngine& self, nb::handle forward, const std::vector<mx::array>& params,
             const mx::array& x, const mx::array& keys, int64_t n, float sigma, int batch_size,
             int num_classes, bool overlap) {
            if (!PyCallable_Check(forward.ptr())) {
              throw std::invalid_argument("[certify] forward must be callable");
            }
            VoteConfig cfg;
            cfg.n = n;
            cfg.sigma = sigma;
            cfg.batch_size = batch_size;
            cfg.num_classes = num_classes;
            cfg.overlap = overlap;
            auto fn = borrow_forward(forward, "certify");
            Votes votes = [&] {
              nb::gil_scoped_release nogil;
              return self.vote_counts(fn, params, x, keys, cfg);
            }();
            return nb::make_tuple(votes.counts, votes.nonfinite);
          },
          "forward"_a, "params"_a, "x"_a, "keys"_a, nb::kw_only(), "n"_a, "sigma"_a, "batch_size"_a,
          "num_classes"_a, "overlap"_a = true,
          "(counts, nonfinite): class votes (N, num_classes) int32 of argmax forward(params, x_i + "
          "N(0, sigma^2 I)) over n draws per input, in chunks of batch_size rows (chunk c of input i "
          "uses key split(keys[i], chunks)[c]), and the draws (N,) int32 whose logits were not all "
          "finite, which vote for no class. `forward(params, x)` is called only while tracing.");
  bind_engine_common(smoothing_engine);

  m.def("chunk_rows", &chunk_rows, "n"_a, "batch_size"_a,
      "Rows of each model batch drawing n noisy copies of one input: full batches, then the rest.");
  m.def("smoothed_predict", &smoothed_predict, "counts"_a, "alpha"_a, "nonfinite"_a = nb::none(),
      "PREDICT (Cohen et al. 2019) on vote counts (N, C): the top class, or -1 where the two-sided "
      "binomial test of the top two counts has p-value > alpha, or where no draw voted (nonfinite: "
      "(N,) draws that voted for no class).");
  m.def(
      "certify_from_counts",
      [](const mx::array& counts0, const mx::array& counts, double sigma, double alpha,
         const std::optional<mx::array>& nonfinite0, const std::optional<mx::array>& nonfinite) {
        auto c = certify_from_counts(counts0, counts, sigma, alpha, nonfinite0, nonfinite);
        return nb::make_tuple(c.prediction, c.radius, c.p_lower);
      },
      "counts0"_a, "counts"_a, "sigma"_a, "alpha"_a, "nonfinite0"_a = nb::none(), "nonfinite"_a = nb::none(),
      "CERTIFY (Cohen et al. 2019) on selection counts0 and estimation counts (N, C): returns "
      "(prediction, radius, p_lower); -1 and radius 0 where the Clopper-Pearson bound pA <= 1/2. "
      "nonfinite0 / nonfinite: (N,) selection / estimation draws that voted for no class; the "
      "estimation's count in n (they only lower pA), and a row without a selection vote abstains.");

  m.def("clopper_pearson_lower", &clopper_pearson_lower, "k"_a, "n"_a, "alpha"_a,
      "One-sided Clopper-Pearson lower bound of a binomial proportion at level 1 - alpha: the "
      "alpha-quantile of Beta(k, n - k + 1); 0 for k = 0.");
  m.def("clopper_pearson_upper", &clopper_pearson_upper, "k"_a, "n"_a, "alpha"_a,
      "One-sided Clopper-Pearson upper bound at level 1 - alpha; 1 for k = n.");
  m.def("binomial_test_pvalue", &binomial_test_pvalue, "k"_a, "n"_a, "p"_a = 0.5,
      "Two-sided exact binomial test p-value, as scipy.stats.binomtest(k, n, p).pvalue.");
  m.def("binomial_cdf", &binomial_cdf, "k"_a, "n"_a, "p"_a, "P(X <= k) for X ~ Binomial(n, p).");
  m.def("binomial_sf", &binomial_sf, "k"_a, "n"_a, "p"_a, "P(X > k) for X ~ Binomial(n, p).");
  m.def("normal_ppf", &normal_ppf, "p"_a, "Standard normal quantile Phi^-1(p) (Wichura AS 241).");
  m.def("normal_cdf", &normal_cdf, "x"_a, "Standard normal CDF Phi(x).");
  m.def("betainc", &betainc, "a"_a, "b"_a, "x"_a, "Regularized incomplete beta I_x(a, b).");
  m.def("betaincinv", &betaincinv, "a"_a, "b"_a, "p"_a,
      "Inverse regularized incomplete beta: x with I_x(a, b) = p.");
}
