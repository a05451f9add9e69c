// What the Python side asks the library before registering its kernels (cpu_library.py).
extern "C" int SpanjaxCpuSupported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
