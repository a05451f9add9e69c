// How the CPU product kernels (`quantized_matmul/`, `packed_matmul/`) walk the rows of x: tiles
// of a fixed number of rows, each against one pass over the weights, then one tile of the rest.
#pragma once

#include <cstdint>
#include <type_traits>

namespace spanjax {

// Calls `tile(std::integral_constant<int, RB>{}, r0)` for rows [r0, r0 + RB) of `rows`: tiles of
// kRows rows, then one of the 1 .. kRows - 1 left (RB a compile-time constant, so each size gets
// its own register allocation).
template <int kRows, typename Tile>
void ForRowTiles(int64_t rows, Tile tile) {
  static_assert(kRows >= 1 && kRows <= 8, "the rest is at most seven rows");
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) tile(std::integral_constant<int, kRows>{}, r);
  switch (rows - r) {
    case 1: if constexpr (kRows > 1) tile(std::integral_constant<int, 1>{}, r); break;
    case 2: if constexpr (kRows > 2) tile(std::integral_constant<int, 2>{}, r); break;
    case 3: if constexpr (kRows > 3) tile(std::integral_constant<int, 3>{}, r); break;
    case 4: if constexpr (kRows > 4) tile(std::integral_constant<int, 4>{}, r); break;
    case 5: if constexpr (kRows > 5) tile(std::integral_constant<int, 5>{}, r); break;
    case 6: if constexpr (kRows > 6) tile(std::integral_constant<int, 6>{}, r); break;
    case 7: if constexpr (kRows > 7) tile(std::integral_constant<int, 7>{}, r); break;
    default: break;
  }
}

}  // namespace spanjax
