// Which vector width the CPU kernels use. The library is built for AVX2 (`-mavx2`); functions
// for wider registers are compiled for AVX512 with `SPANJAX_AVX512` and taken at run time when
// the CPU has it, so one build runs on both kinds of machine. Tests turn the AVX512 paths off
// (`SpanjaxSetAvx512`) to check the AVX2 ones on the same machine.
#pragma once

#define SPANJAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
// The int8 products (quantized_matmul/cpu_int8.cc) have no AVX2 version: they need VNNI.
#define SPANJAX_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

namespace spanjax {

// On where the CPU has AVX512F/BW/VL/DQ, unless switched off.
bool UseAvx512();

// Whether the CPU has AVX512F/BW/VL/DQ and AVX512-VNNI (the switch above does not apply).
bool VnniSupported();

}  // namespace spanjax
