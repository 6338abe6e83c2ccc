"""Build and install mpiep.

The Python package always installs. The compiled core ``mpiep._C`` (C++/CUDA,
pybind11, NVSHMEM) is built only when nvcc, pybind11 and NVSHMEM are all found;
otherwise mpiep runs on its reference backend. Either way setup.py says what it
built and why.

Environment:
  MPIEP_BUILD_CORE=0|1|auto  skip, require, or try the compiled core (default auto)
  CUDA_HOME                  where nvcc lives (default: nvcc on PATH)
  NVSHMEM_DIR                NVSHMEM install (default: the nvidia-nvshmem-cu13 wheel)
  MPIEP_CUDA_ARCH            nvcc -arch value (default sm_90)
  MPIEP_NVCC_THREADS         nvcc --threads (default 2)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[mpiep setup] {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir(nvcc: str) -> Path:
    """CUDA's headers for host-only compiles (nvcc may be a wrapper script elsewhere)."""
    candidates = [Path(nvcc).resolve().parent.parent / "include"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates += [Path("/usr/local/cuda/include")]
    candidates += sorted(Path(p) for p in glob.glob("/usr/local/cuda-*/include"))
    for c in candidates:
        if (c / "cuda_runtime.h").exists():
            return c
    raise SystemExit(f"[mpiep setup] cuda_runtime.h not found (looked in {candidates})")


def find_nvshmem() -> Path | None:
    candidates: list[Path] = []
    if os.environ.get("NVSHMEM_DIR"):
        candidates.append(Path(os.environ["NVSHMEM_DIR"]))
    try:
        import nvidia.nvshmem as wheel  # type: ignore[import-not-found]

        candidates += [Path(p) for p in wheel.__path__]
    except ImportError:
        pass
    for path in candidates:
        if (path / "include" / "nvshmem.h").exists() and (
            path / "lib" / "libnvshmem_device.a"
        ).exists():
            return path
    return None


def core_sources() -> list[str]:
    """Everything under src/ except the torch op layer (src/ops/, built as mpiep._ops)."""
    found = glob.glob("src/**/*.cu", recursive=True) + glob.glob("src/**/*.cpp", recursive=True)
    return sorted(f for f in found if not f.startswith("src/ops/"))


def ops_sources() -> list[str]:
    return sorted(glob.glob("src/ops/*.cpp"))


def torch_build_info() -> dict | None:
    """Include/library paths and ABI flags of the installed torch, or None without torch."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    # The pybind11 ABI of torch's own bindings, as torch's BuildExtension passes it.
    for name in ("COMPILER_TYPE", "STDLIB", "BUILD_ABI"):
        value = getattr(torch._C, f"_PYBIND11_{name}", None)
        if value is not None:
            flags.append(f'-DPYBIND11_{name}="{value}"')
    return {
        "version": torch.__version__,
        "include": cpp_extension.include_paths(),
        "lib": cpp_extension.library_paths(),
        "flags": flags,
    }


class BuildCore(build_ext):
    """Compiles every src/**/*.cu|cpp with nvcc (-rdc) and links them into one .so.

    NVSHMEM's device library must be linked into exactly one shared object, so the
    whole core is one extension, linked by nvcc (which performs the device link).
    """

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "mpiep._ops":
            self.build_ops(ext)
            return
        nvcc = ext.nvcc  # type: ignore[attr-defined]
        nvshmem = ext.nvshmem  # type: ignore[attr-defined]
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "core"
        tmp.mkdir(parents=True, exist_ok=True)

        import pybind11

        cuda_home = Path(nvcc).resolve().parent.parent
        arch = os.environ.get("MPIEP_CUDA_ARCH", "sm_90")
        includes = [
            ROOT / "include",
            ROOT / "src",
            nvshmem / "include",
            cuda_home / "include",
            cuda_home / "include" / "cccl",
            Path(pybind11.get_include()),
            Path(sysconfig.get_paths()["include"]),
        ]
        common = [
            "-std=c++17",
            "-O3",
            f"-arch={arch}",
            "-rdc=true",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            f"--threads={os.environ.get('MPIEP_NVCC_THREADS', '2')}",
            "-DNDEBUG",
        ] + [f"-I{p}" for p in includes]
        if os.environ.get("MPIEP_DISABLE_PTX_TRICKS") == "1":
            common.append("-DMPIEP_DISABLE_PTX_TRICKS")

        objects = []
        for src in ext.sources:
            obj = tmp / (src.replace("/", "_") + ".o")
            objects.append(str(obj))
            if obj.exists() and obj.stat().st_mtime > max(
                Path(src).stat().st_mtime, newest_header_mtime()
            ):
                continue
            lang = ["-x", "cu"] if src.endswith(".cu") else []
            self.spawn([nvcc, *common, *lang, "-c", src, "-o", str(obj)])

        nvshmem_lib = nvshmem / "lib"
        self.spawn(
            [
                nvcc,
                "-shared",
                f"-arch={arch}",
                "-rdc=true",
                "-Xcompiler=-fPIC",
                *objects,
                str(nvshmem_lib / "libnvshmem_device.a"),
                f"-L{nvshmem_lib}",
                "-l:libnvshmem_host.so.3",
                "-cudart=static",
                f"-Xlinker=-rpath,{nvshmem_lib}",
                # mpiep._ops links against the core by this name (see build_ops).
                f"-Xlinker=-soname,{out.name}",
                "-o",
                str(out),
            ]
        )
        log(f"built the CUDA core {out.name} for {arch} with NVSHMEM from {nvshmem}")

    def build_ops(self, ext: Extension) -> None:
        """The torch op layer: host C++ (g++) against torch and the core built just before."""
        info = ext.torch  # type: ignore[attr-defined]
        cuda_include = cuda_include_dir(ext.nvcc)  # type: ignore[attr-defined]
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        core = Path(self.get_ext_fullpath("mpiep._C")).resolve()
        tmp = Path(self.build_temp).resolve() / "ops"
        tmp.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        includes = [
            *info["include"],
            ROOT / "include",
            ROOT / "src",
            cuda_include,
            Path(sysconfig.get_paths()["include"]),
        ]
        common = [
            "-std=c++17",
            "-O3",
            "-fPIC",
            "-fvisibility=hidden",
            "-DNDEBUG",
            # No a * b + c turned into an fma behind our back: the reference backend's CPU
            # kernels (reference_cpu_ops.cpp) must round exactly as the torch code they
            # replace, and say where they want an fma.
            "-ffp-contract=off",
            "-DTORCH_EXTENSION_NAME=_ops",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            *info["flags"],
        ] + [f"-I{p}" for p in includes]
        objects = []
        for src in ext.sources:
            obj = tmp / (src.replace("/", "_") + ".o")
            objects.append(str(obj))
            if obj.exists() and obj.stat().st_mtime > max(
                Path(src).stat().st_mtime, newest_header_mtime()
            ):
                continue
            self.spawn([cxx, *common, "-c", src, "-o", str(obj)])
        libs = [f"-L{d}" for d in info["lib"]] + [f"-Wl,-rpath,{d}" for d in info["lib"]]
        self.spawn(
            [
                cxx,
                "-shared",
                *objects,
                *libs,
                "-lc10",
                "-ltorch",
                "-ltorch_cpu",
                "-ltorch_python",
                f"-L{core.parent}",
                f"-l:{core.name}",
                "-Wl,-rpath,$ORIGIN",
                "-o",
                str(out),
            ]
        )
        log(f"built the torch op layer {out.name} against torch {info['version']}")


def newest_header_mtime() -> float:
    headers = glob.glob("include/**/*.h*", recursive=True) + glob.glob(
        "src/**/*.h*", recursive=True
    )
    return max((Path(h).stat().st_mtime for h in headers), default=0.0)


def core_extensions() -> list[Extension]:
    mode = os.environ.get("MPIEP_BUILD_CORE", "auto").lower()
    if mode in ("0", "no", "off"):
        log("MPIEP_BUILD_CORE=0: not building the CUDA core; the reference backend only")
        return []
    nvcc, nvshmem = find_nvcc(), find_nvshmem()
    try:
        import pybind11  # noqa: F401

        have_pybind = True
    except ImportError:
        have_pybind = False
    missing = [
        name
        for name, ok in (
            ("nvcc", nvcc),
            ("NVSHMEM (pip nvidia-nvshmem-cu13 or NVSHMEM_DIR)", nvshmem),
            ("pybind11", have_pybind),
        )
        if not ok
    ]
    if missing:
        msg = (
            f"not building the CUDA core: missing {', '.join(missing)}; the reference backend only"
        )
        if mode in ("1", "yes", "on"):
            raise SystemExit(f"[mpiep setup] MPIEP_BUILD_CORE=1 but {msg}")
        log(msg)
        return []
    log(f"building the CUDA core with {nvcc} and NVSHMEM at {nvshmem}")
    ext = Extension("mpiep._C", sources=core_sources())
    ext.nvcc = nvcc  # type: ignore[attr-defined]
    ext.nvshmem = nvshmem  # type: ignore[attr-defined]
    torch_info = torch_build_info()
    if torch_info is None:
        msg = "not building the torch op layer mpiep._ops: torch is not installed"
        if mode in ("1", "yes", "on"):
            raise SystemExit(f"[mpiep setup] MPIEP_BUILD_CORE=1 but {msg}")
        log(msg)
        return [ext]
    ops = Extension("mpiep._ops", sources=ops_sources())
    ops.nvcc = nvcc  # type: ignore[attr-defined]
    ops.torch = torch_info  # type: ignore[attr-defined]
    return [ext, ops]


setup(
    name="mpiep",
    version="0.1.0",
    description="Expert-parallel (MoE) all-to-all for MPI-launched GPU clusters",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"mpiep": ["py.typed"]},
    install_requires=["numpy", "mpi4py>=3.1"],
    extras_require={
        "test": ["pytest", "pytest-mpi", "pytest-timeout"],
        "cuda": ["nvidia-nvshmem-cu13", "pybind11"],
    },
    entry_points={"console_scripts": ["mpiep=mpiep.cli:main"]},
    ext_modules=core_extensions(),
    cmdclass={"build_ext": BuildCore},
    zip_safe=False,
)
