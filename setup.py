"""Builds the C++ CPU kernels (csrc/) into `embedcore._C` and maps the top-level `kernels/`
folder to `embedcore.kernels` (a top-level `kernels` module would shadow Hugging Face's
`kernels` package, which transformers probes for)."""
import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("EMBEDCORE_NO_EXTENSION") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx = ["-O3", "-std=c++17"]
    libs = []
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
        libs = ["gomp"]
    ext_modules = [
        CppExtension(
            "embedcore._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx},
            libraries=libs,
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=[
        "embedcore",
        *[f"embedcore.{p}" for p in ("ops", "nn", "lora", "models", "data", "train", "retrieval")],
        "embedcore.kernels",
    ],
    package_dir={"embedcore.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
