// What the Python side asks the library before registering its kernels (cpu_library.py), and
// the switch between the kernels' AVX2 and AVX512 paths (cpu_isa.h).

#include <atomic>

#include "cpu_isa.h"

namespace spanjax {
namespace {

bool Avx512Supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

std::atomic<bool> use_avx512{Avx512Supported()};

}  // namespace

bool UseAvx512() { return use_avx512.load(std::memory_order_relaxed); }

bool VnniSupported() { return Avx512Supported() && __builtin_cpu_supports("avx512vnni"); }

}  // namespace spanjax

extern "C" int SpanjaxCpuSupported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

extern "C" int SpanjaxAvx512Supported() { return spanjax::Avx512Supported(); }

extern "C" int SpanjaxVnniSupported() { return spanjax::VnniSupported(); }

// Turns the AVX512 paths on (where supported) or off; returns whether they were on.
extern "C" int SpanjaxSetAvx512(int on) {
  return spanjax::use_avx512.exchange(on != 0 && spanjax::Avx512Supported());
}
