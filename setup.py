import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.environ.get("FASTVL_NATIVE", "1") not in ("0", "")


class NativeBuildError(RuntimeError):
    pass


class CMakeBuild(build_ext):
    """Builds the native CPU backend fastvl._C with CMake (CMakeLists.txt) against the installed torch.

    The build folder build/native persists, so a reinstall recompiles only what changed. A failure
    stops the install with the reason: the backend is never silently missing.
    """

    def build_extension(self, ext):
        try:
            self._cmake(ext)
        except NativeBuildError as exc:
            raise SystemExit(
                f"\nfastvl: the native CPU backend (fastvl._C) is unavailable: {exc}\n"
                "Install with FASTVL_NATIVE=0 to go without it (CPU ops then run the plain-PyTorch reference).\n"
            ) from None

    def _cmake(self, ext):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NativeBuildError(
                "torch is not importable by the build. It builds against the installed torch: install torch "
                "first, then fastvl with `pip install --no-build-isolation -e .` (an isolated build environment "
                "would fetch another torch)"
            ) from None
        cmake = _tool("cmake")
        if cmake is None:
            raise NativeBuildError("no cmake found (system package, or `pip install cmake ninja`)")
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(ROOT, "build", "native")
        configure = [
            cmake, "-S", ROOT, "-B", build_dir, f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTVL_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release",
            f"-DFASTVL_CPU_ARCH={os.environ.get('FASTVL_CPU_ARCH', 'native')}",
        ]
        ninja = _tool("ninja")
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if ninja and not os.path.exists(cache):  # a generator is fixed at the first configure
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("FASTVL_BUILD_JOBS", str(os.cpu_count() or 1))
        for step in (configure, [cmake, "--build", build_dir, "-j", jobs]):
            if subprocess.run(step, cwd=ROOT).returncode:
                raise NativeBuildError(f"`{' '.join(step)}` failed (its output is above)")
        built = os.path.join(out_dir, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
        if not os.path.exists(built):
            raise NativeBuildError(f"CMake did not produce {built}")


def _tool(name):
    """A build tool on PATH, else the one a PyPI package (cmake, ninja) put beside this interpreter."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return shutil.which(name) or (beside if os.access(beside, os.X_OK) else None)


setup(
    name="fastvl",
    version="0.1.0",
    description="Fused Triton kernels and model code for fast small vision-language models",
    python_requires=">=3.10",
    packages=["fastvl", "fastvl.kernels", "fastvl.bench"]
    + ["fastvl." + p for p in find_packages("fastvl")],
    # kernels/ and bench/ live at the top level of the repository but are imported as
    # fastvl.kernels and fastvl.bench (an editable install resolves the mapping too).
    package_dir={"fastvl": "fastvl", "fastvl.kernels": "kernels", "fastvl.bench": "bench"},
    # FASTVL_NATIVE=0 skips the native CPU backend (fastvl._C, CMakeLists.txt)
    ext_modules=[Extension("fastvl._C", sources=[])] if NATIVE else [],
    cmdclass={"build_ext": CMakeBuild},
    package_data={"fastvl.train": ["configs/*.json"]},  # the shipped DeepSpeed ZeRO configs
    install_requires=["torch>=2.5", "triton>=3.2; platform_system=='Linux'", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "transformers>=5.0"],
        "hf": ["transformers>=5.0", "safetensors", "pillow"],
        "train": ["deepspeed"],
        "bench": ["matplotlib", "tqdm"],
        "gpu": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["fastvl=fastvl.cli:main"]},
)
