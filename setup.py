"""Builds the C++ CPU kernels (always) and the CUDA decode kernels (when nvcc and a CUDA torch exist)."""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _openmp_flags():
    return ["-fopenmp"], ["-fopenmp"]


def _simd_flags():
    """AVX2 + FMA (and at::vec's AVX2 path) when the build machine has them; plain x86-64-v2 otherwise.

    Set AVAR_CPU_SIMD=generic to build a portable extension on an AVX2 machine.
    """
    if os.environ.get("AVAR_CPU_SIMD", "auto") == "generic":
        return ["-march=x86-64-v2"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return ["-march=x86-64-v2"]
    if " avx2" in flags and " fma" in flags:
        return ["-march=x86-64-v2", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-march=x86-64-v2"]


def cpu_extension():
    cflags, lflags = _openmp_flags()
    return CppExtension(
        name="avar_kernels._C",
        sources=sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        extra_compile_args={"cxx": ["-O3", "-std=c++17", *_simd_flags(), *cflags]},
        extra_link_args=lflags,
    )


def cuda_extension():
    """The decode kernels need a CUDA toolkit and a CUDA build of torch; skipped (and said) otherwise."""
    if os.environ.get("AVAR_NO_CUDA") == "1":
        return None
    if CUDA_HOME is None or torch.version.cuda is None:
        print("avar-kernels: no CUDA toolkit or CPU-only torch: building without the CUDA decode kernels")
        return None
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + ["csrc/cuda_bindings.cpp"]
    archs = os.environ.get("AVAR_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return CUDAExtension(
        name="avar_kernels._cuda",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *gencode]},
    )


ext_modules = [e for e in (cpu_extension(), cuda_extension()) if e is not None]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
