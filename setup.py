"""Builds the C++ CPU kernels (csrc/) into `embedcore._C` and installs the Triton kernels of the
top-level `kernels/` folder as `embedcore.kernels` only. That folder has no `__init__.py`: a
top-level importable `kernels` would shadow Hugging Face's `kernels` package, which transformers
imports (see embedcore/kernels/__init__.py for how a checkout finds them)."""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """A wheel gets kernels/*.py inside embedcore/kernels/ (an editable install reads the folder)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "embedcore", "kernels")
        os.makedirs(target, exist_ok=True)
        for src in sorted(glob.glob("kernels/*.py")):
            shutil.copy2(src, target)


ext_modules, cmdclass = [], {"build_py": BuildPyWithKernels}
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
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=[
        "embedcore",
        *[f"embedcore.{p}" for p in ("ops", "nn", "lora", "models", "data", "train", "retrieval", "kernels")],
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
