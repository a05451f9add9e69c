"""The C++ CPU kernel (`cpu_kernel.cc`): built on first use, registered as an XLA FFI target.

The shared library is compiled with the system's C++ compiler into a per-user cache
directory, named by a hash of the source, the flags and the jaxlib version, so a machine
builds it once (~5 s). Everything degrades to the jnp reference when it cannot be used: no
compiler, a CPU without AVX2/FMA/F16C, a failed build, or `SPANJAX_CPU_KERNELS=0`; the
reason is kept in `unavailable_reason()`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib

from spanjax.kernels.quantized_matmul.format import BlockQuantized

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernel.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-mf16c")
TARGETS = {"q4": "spanjax_q4_matmul", "q8": "spanjax_q8_matmul"}
_SYMBOLS = {"q4": "SpanjaxQ4Matmul", "q8": "SpanjaxQ8Matmul"}
ENV_SWITCH = "SPANJAX_CPU_KERNELS"  # "0" turns the kernel off
ENV_CACHE = "SPANJAX_KERNEL_CACHE"  # where built libraries go (default ~/.cache/spanjax/kernels)

_reason: str | None = None


def _cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "spanjax", "kernels")
    return os.environ.get(ENV_CACHE, default)


def _build() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(FLAGS).encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    os.makedirs(_cache_dir(), exist_ok=True)
    target = os.path.join(_cache_dir(), f"quantized_matmul-{key}.so")
    if os.path.exists(target):
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building {SOURCE} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, target)  # atomic: concurrent builders (test workers) never load half a file
    return target


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process)."""
    global _reason
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _reason = f"{ENV_SWITCH}=0"
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(_build())
        if not lib.SpanjaxCpuSupported():
            _reason = "this CPU lacks AVX2, FMA or F16C"
            return False
        for fmt, name in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[fmt])), platform="cpu")
    except (OSError, RuntimeError) as e:
        _reason = str(e)
        warnings.warn(f"spanjax: the quantized CPU kernel is unavailable, using the jnp reference ({e})", stacklevel=2)
        return False
    return True


def unavailable_reason() -> str | None:
    available()
    return _reason


def quantized_matmul_cpu(x2, w: BlockQuantized) -> jax.Array:
    """x2 fp32 [R, in] times w [out, in] transposed -> fp32 [R, out]; w has no leading axes."""
    out = jax.ShapeDtypeStruct((x2.shape[0], w.out_features), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[w.format], out)
    x2 = x2.astype(jnp.float32)
    if w.format == "q4":
        return call(x2, w.q, w.scale, w.offset)
    return call(x2, w.q, w.scale)
