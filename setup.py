"""Builds the C++ CPU kernels (always) and the CUDA decode kernels (when nvcc and a CUDA torch exist).

CPU instruction sets, chosen at run time: csrc/cpu/attention.cpp is compiled twice, as ``avar_kernels._C``
(portable: the compiler's default target, no -march, so it runs on any CPU of the architecture) and, on x86-64,
as ``avar_kernels._C_avx2`` (AVX2 + FMA + F16C, ATen's AVX2 vector path). ``avar_kernels.cpu`` loads
``_C_avx2`` when torch reports an AVX2 or AVX-512 CPU (``torch.backends.cpu.get_cpu_capability()``, which honours
``ATEN_CPU_CAPABILITY=default``) and ``_C`` otherwise. Nothing is read from the build machine's CPU, so a wheel
built on one x86-64 machine runs on another. BLAS (MKL / OpenBLAS inside torch) picks its own kernels at run time.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# -ffp-contract=off: no fused multiply-adds the source did not ask for, so that the same expression inlined in the
# forward and in the backward rounds the same way (the backward recomputes the forward's scores bit for bit).
CPU_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def cpu_extensions():
    """The portable build, and on x86-64 the AVX2 build of the same source."""
    exts = [CppExtension(name="avar_kernels._C", sources=CPU_SOURCES, extra_compile_args={"cxx": CPU_FLAGS},
                         extra_link_args=["-fopenmp"])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        exts.append(CppExtension(name="avar_kernels._C_avx2", sources=CPU_SOURCES,
                                 extra_compile_args={"cxx": CPU_FLAGS + AVX2_FLAGS}, extra_link_args=["-fopenmp"]))
    return exts


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


class BuildPerExtension(BuildExtension):
    """Compiles each extension's objects in a directory of its own: _C and _C_avx2 share their source file."""

    def build_extension(self, ext):
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


ext_modules = [*cpu_extensions(), *[e for e in (cuda_extension(),) if e is not None]]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildPerExtension})
