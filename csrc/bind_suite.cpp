// Python bindings for the attack suite beyond PGD: APGD, Carlini-Wagner, Square.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void init_suite(nb::module_& m) {
  (void)m;
}
