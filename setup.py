"""Build lowrank_kernels and its C++ CPU extension ``lowrank_kernels._C``.

Every ``csrc/**/*.cpp`` file (``csrc/cpu/<family>.cpp``, ``csrc/cpu/projection/*.cpp``,
...) is compiled into one extension with ninja through torch's extension tools, so a new
source file needs no change here. ``csrc/registration.cpp`` registers the kernels with
the dispatcher (docs/architecture.md, "Ops and C++ kernels").

Set ``LOWRANK_KERNELS_NO_EXT=1`` to install the pure-Python package only
(reference and Triton backends).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("LOWRANK_KERNELS_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    ext_modules.append(
        CppExtension(
            name="lowrank_kernels._C",
            sources=sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="lowrank_kernels",
    version="0.1.0",
    description="Memory-efficient low-rank gradient optimizers (GaLore family) on fused kernels",
    author="The lowrank_kernels authors",
    license_expression="BSD-3-Clause",
    license_files=["LICENSE"],
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
