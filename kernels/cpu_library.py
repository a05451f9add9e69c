"""The C++ CPU kernels, one shared library: built on first use, registered as XLA FFI targets.

Sources: `quantized_matmul/cpu_kernel.cc` (block-quantized products),
`quantized_matmul/cpu_int8.cc` (the same with int8 activations, AVX512-VNNI),
`packed_matmul/cpu_kernel.cc` (fp32 weights in column panels) and
`span_attention/cpu_attention.cc` (decode and prefill attention), with the helper threads they share
(`cpu_threads.h`: one pool per process, which is why they are one library). It is compiled
with the system's C++ compiler into a per-user cache directory, named by a hash of the
sources, the flags and the jaxlib version, so a machine builds it once (~10 s). Callers fall
back to their jnp paths when it cannot be used: no compiler, a CPU without AVX2/FMA/F16C, a
failed build, or `SPANJAX_CPU_KERNELS=0`; the reason is kept in `unavailable_reason()`.
The library is built for AVX2; where the CPU has AVX512, kernels that have a 16-wide path take
it at run time (`cpu_isa.h`; `set_avx512` switches it off, e.g. to test the AVX2 paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jaxlib

_HERE = os.path.dirname(__file__)
SOURCES = tuple(
    os.path.join(_HERE, f)
    for f in (
        "cpu_library.cc",
        "quantized_matmul/cpu_kernel.cc",
        "quantized_matmul/cpu_int8.cc",
        "packed_matmul/cpu_kernel.cc",
        "span_attention/cpu_attention.cc",
    )
)
HEADERS = tuple(
    os.path.join(_HERE, f) for f in ("cpu_threads.h", "cpu_isa.h", "cpu_row_tiles.h", "quantized_matmul/products.h")
)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-mf16c")
# FFI target name -> exported handler symbol
TARGETS = {
    "spanjax_quantized_matmuls": "SpanjaxQuantizedMatmuls",
    "spanjax_quantized_matmuls_int8": "SpanjaxQuantizedMatmulsInt8",
    "spanjax_quantized_matmuls_lanes": "SpanjaxQuantizedMatmulsLanes",
    "spanjax_packed_matmuls": "SpanjaxPackedMatmuls",
    "spanjax_decode_attention_f32": "SpanjaxDecodeAttentionF32",
    "spanjax_decode_attention_bf16": "SpanjaxDecodeAttentionBf16",
    "spanjax_prefill_attention_f32": "SpanjaxPrefillAttentionF32",
    "spanjax_prefill_attention_bf16": "SpanjaxPrefillAttentionBf16",
}
ENV_SWITCH = "SPANJAX_CPU_KERNELS"  # "0" turns the kernels off
ENV_CACHE = "SPANJAX_KERNEL_CACHE"  # where built libraries go (default ~/.cache/spanjax/kernels)

_reason: str | None = None
_lib: ctypes.CDLL | None = None


def _cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "spanjax", "kernels")
    return os.environ.get(ENV_CACHE, default)


def _build() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    h = hashlib.sha256(" ".join(FLAGS).encode() + jaxlib.__version__.encode())
    for path in (*SOURCES, *HEADERS):
        with open(path, "rb") as f:
            h.update(f.read())
    os.makedirs(_cache_dir(), exist_ok=True)
    target = os.path.join(_cache_dir(), f"spanjax_cpu-{h.hexdigest()[:16]}.so")
    # One builder at a time (test workers, engine replicas start together); the others wait
    # for its file instead of compiling the same library beside it.
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(target):
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), "-I", _HERE, *SOURCES, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building the CPU kernels failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: a reader never loads half a file
    return target


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (once per process)."""
    global _reason, _lib
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _reason = f"{ENV_SWITCH}=0"
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(_build())
        if not lib.SpanjaxCpuSupported():
            _reason = "this CPU lacks AVX2, FMA or F16C"
            return False
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _lib = lib
    except (OSError, RuntimeError) as e:
        _reason = str(e)
        warnings.warn(f"spanjax: the C++ CPU kernels are unavailable, using the jnp paths ({e})", stacklevel=2)
        return False
    return True


def unavailable_reason() -> str | None:
    available()
    return _reason


def avx512_supported() -> bool:
    """Whether the kernels can take their AVX512 paths on this CPU (False without the library)."""
    return available() and bool(_lib.SpanjaxAvx512Supported())


def vnni_supported() -> bool:
    """Whether the int8 products (`quantized_matmul/cpu_int8.cc`, AVX512-VNNI) run here."""
    return available() and bool(_lib.SpanjaxVnniSupported())


def set_avx512(on: bool) -> bool:
    """Turns the kernels' AVX512 paths on (where supported) or off for this process; returns
    whether they were on. They are on by default where the CPU has AVX512F/BW/VL/DQ; off is
    for checking the AVX2 paths on such a machine and for comparing the two."""
    if not available():
        return False
    return bool(_lib.SpanjaxSetAvx512(int(on)))


@contextlib.contextmanager
def avx512(on: bool):
    """`set_avx512(on)` for the `with` block. Each kernel call reads the switch, so programs
    compiled before it follow it."""
    was = set_avx512(on)
    try:
        yield
    finally:
        set_avx512(was)


def vector_widths() -> list[bool]:
    """The AVX512 switch's settings worth testing here: off, and on where the CPU has it."""
    return [False, True] if avx512_supported() else [False]
