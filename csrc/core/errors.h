// One message style for every error the core throws: "[tag] name must be ..., got ...".
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>

#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/** "(64, 8, 8, 1)" / "(64,)": a shape for error messages, built without std::ostringstream
    (a message built with one crashed an in-place g++ 13 build against the mlx-cuda wheel). */
inline std::string shape_string(const mx::array& a) {
  std::string out = "(";
  for (int i = 0; i < static_cast<int>(a.ndim()); ++i) {
    out += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return out + (a.ndim() == 1 ? ",)" : ")");
}

/** A number for error messages, printed the same way everywhere ("%g"). */
inline std::string num_string(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

/** Throw std::invalid_argument("[tag] <message>"). */
[[noreturn]] inline void fail(const std::string& tag, const std::string& message) {
  throw std::invalid_argument("[" + tag + "] " + message);
}

/** Throw std::invalid_argument("[tag] name constraint, got got"), e.g.
    fail("pgd", "eps", "must be >= 0", "-0.1"). */
[[noreturn]] inline void fail(const std::string& tag, const std::string& name, const std::string& constraint,
                              const std::string& got) {
  throw std::invalid_argument("[" + tag + "] " + name + " " + constraint + ", got " + got);
}

} // namespace mlx_robust
