// Pieces of our error messages as strings. TORCH_CHECK streams its arguments into a
// std::ostringstream; on the lent H100 (torch 2.11 wheel, this extension built there with the
// system g++ 13) streaming an integer from this library reached the wrong locale facet and
// crashed the process where a ValueError was due (cuda-gdb, 2026-11-23: ostream::_M_insert<long>
// into codecvt<char16_t>::do_unshift; messages made of strings alone raised cleanly). So every
// non-literal argument of a check goes through r1k::msg, which formats it without the stream's
// numeric facets and in the same text the stream would have written.
#pragma once
#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace r1k {

inline std::string msg(const char* s) { return s; }
inline std::string msg(const std::string& s) { return s; }
inline std::string msg(std::string_view s) { return std::string(s); }
inline std::string msg(c10::ScalarType t) { return c10::toString(t); }
inline std::string msg(const c10::Device& d) { return d.str(); }
inline std::string msg(at::IntArrayRef v) {
  std::string r = "[";
  for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
  return r + "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline std::string msg(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));  // the stream's default format
    return buf;
  } else if constexpr (std::is_same_v<T, bool>) {
    return v ? "1" : "0";
  } else {
    return std::to_string(v);
  }
}

}  // namespace r1k
