// Python bindings for randomized smoothing and certification statistics.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void init_smoothing(nb::module_& m) {
  (void)m;
}
