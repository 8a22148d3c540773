// Helpers shared by the binding files (bind_*.cpp, bindings.cpp).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "core/engine.h"
#include "core/scoring.h"

namespace mlx_robust {

namespace nb = nanobind;

/**
 * Borrow a Python model callable `fn(params: list[mx.array], x: mx.array) -> mx.array` as a
 * ForwardFn. The caller keeps it alive for the call, and nothing C++ stores holds a reference, so
 * no hidden cycle can keep the model alive. The GIL is re-acquired for each call (the core runs
 * with it released) and a non-array result becomes std::invalid_argument("[<where>] ...").
 * The returned graph has its window maxima rewritten (rewrite_window_max; exact, faster).
 */
inline ForwardFn borrow_forward(nb::handle fn, const char* where = "attack") {
  std::string tag(where);
  return [fn, tag](const std::vector<mx::array>& params, const mx::array& x) -> mx::array {
    nb::gil_scoped_acquire gil;
    nb::object out = fn(nb::cast(params), nb::cast(x));
    mx::array* arr = nullptr;
    if (!nb::try_cast<mx::array*>(out, arr) || arr == nullptr) {
      throw std::invalid_argument(
          "[" + tag + "] the model must return an mx.array of floating-point logits, got " +
          nb::type_name(out.type()).c_str());
    }
    return rewrite_window_max(*arr);
  };
}

/**
 * The members every engine binding shares (CompiledEngine): trace_count, chosen_unroll(shape) and
 * clear() (which takes the core's lock with the GIL released).
 */
template <class Engine>
void bind_engine_common(nb::class_<Engine>& cls) {
  cls.def_prop_ro(
         "trace_count", [](const Engine& self) { return self.trace_count(); },
         "Times the model was traced (Python ran) since construction.")
      .def(
          "chosen_unroll",
          [](const Engine& self, const std::vector<int>& shape) {
            return self.chosen_unroll(mx::Shape(shape.begin(), shape.end()));
          },
          nb::arg("shape"), "Steps (Square: iterations) per compiled call chosen for inputs of this shape (0: none yet).")
      .def(
          "clear",
          [](Engine& self) {
            nb::gil_scoped_release nogil;
            if (in_core()) {
              // Called from a forward being traced (this thread holds the core lock): erase at
              // the next core run instead of waiting for ourselves.
              self.clear_later();
              return;
            }
            CoreLock serial;
            self.clear();
          },
          "Drop every compiled function of this engine.");
}

/** Throw std::invalid_argument("[<where>] forward must be callable") unless `fn` is callable. */
inline void require_callable(nb::handle fn, const char* where = "attack") {
  if (!PyCallable_Check(fn.ptr())) {
    throw std::invalid_argument(std::string("[") + where + "] forward must be callable");
  }
}

} // namespace mlx_robust
