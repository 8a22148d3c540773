// Python bindings for the Square attack (score-based, black-box).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void init_square(nb::module_& m) {
  (void)m;
}
