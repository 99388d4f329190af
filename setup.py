"""Build r1kernels and its extension `r1kernels._C` from csrc/.

What gets built (flags are read here, at the top):
  R1K_SKIP_CUDA_BUILD=1   never build the CUDA kernels, even with a CUDA torch and nvcc.
  R1K_FORCE_CUDA_BUILD=1  build the CUDA kernels or fail (e.g. on a build machine without a GPU).
  R1K_CUDA_ARCHS="80;90"  compute capabilities to compile for (default "80;90"; "90a" allowed).
  R1K_SKIP_EXT=1          build no extension at all (pure Python + Triton install).
  R1K_NO_SIMD_CLONES=1    CPU kernels for the baseline ISA only (no AVX2/AVX-512 copies; CI tests it).
  MAX_JOBS=N              parallel compile jobs (read by torch's ninja builder).

The C++ CPU kernels are always built. The CUDA kernels are built when torch was built with
CUDA and nvcc is found (CUDA_HOME). Without torch installed first the build stops with the fix.
Kernels in csrc/**/*.cu include CUDA headers only; their torch bindings live in *_cuda.cpp.

pip shows a build's output only with -v (or when it fails): with -v the build prints what it
compiles, with how many jobs, one line per file as each finishes and the time it took; the
compilers' own output goes to build/r1kernels-build.log, whose last lines are printed if the build
fails.
"""
import glob
import os
import re
import sys
import threading
import time

from setuptools import setup

SKIP_CUDA = os.environ.get("R1K_SKIP_CUDA_BUILD", "0") == "1"
FORCE_CUDA = os.environ.get("R1K_FORCE_CUDA_BUILD", "0") == "1"
CUDA_ARCHS = os.environ.get("R1K_CUDA_ARCHS", "80;90")
SKIP_EXT = os.environ.get("R1K_SKIP_EXT", "0") == "1"
NO_SIMD_CLONES = os.environ.get("R1K_NO_SIMD_CLONES", "0") == "1"
ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised by hand
    sys.exit(
        "r1kernels: torch must be installed before building r1kernels, and the build must see it.\n"
        "  pip install torch            # or the CPU build: pip install torch --index-url .../cpu\n"
        "  pip install --no-build-isolation .   # or -e . for development"
    )


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_wanted():
    if SKIP_CUDA:
        return False
    have_torch_cuda = torch.version.cuda is not None
    have_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if have_torch_cuda and have_nvcc:
        return True
    if FORCE_CUDA:
        missing = []
        if not have_torch_cuda:
            missing.append(f"torch {torch.__version__} has no CUDA (install a CUDA build of torch)")
        if not have_nvcc:
            missing.append("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
        sys.exit("r1kernels: R1K_FORCE_CUDA_BUILD=1 but " + "; ".join(missing))
    return False


def _gencode_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if not arch:
            continue
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _openmp_flags():
    """(compile, link) flags for the CPU kernels' threads and SIMD loops. On Linux, OpenMP: the
    extension's libgomp.so.1 is the one torch's wheel already loaded (same soname), so
    at::parallel_for runs on torch's intra-op threads (torch.set_num_threads applies); without
    it at::parallel_for in an extension runs serially. Elsewhere the kernels run on one thread."""
    if sys.platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    return [], []


def _extensions():
    if SKIP_EXT:
        return []
    csrc = os.path.join(ROOT, "csrc")
    common = [os.path.join(csrc, "torch_bindings.cpp")]
    cpu_sources = glob.glob(os.path.join(csrc, "**", "*_cpu.cpp"), recursive=True)
    cxx_flags = ["-O3"]  # the C++ standard is chosen by torch.utils.cpp_extension (C++20 for torch >= 2.14)
    omp_compile, omp_link = _openmp_flags()
    cxx_flags += omp_compile
    if NO_SIMD_CLONES:
        cxx_flags.append("-DR1K_NO_SIMD_CLONES")
    if sys.platform != "win32":
        # the CPU kernels' SIMD loops hold float compare-and-selects (exp_simd's range, masks),
        # which GCC vectorizes only when a float comparison may not trap (we use no FP traps)
        cxx_flags.append("-fno-trapping-math")
    if _cuda_wanted():
        cuda_sources = glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True)
        cuda_bind = glob.glob(os.path.join(csrc, "**", "*_cuda.cpp"), recursive=True)
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"] + _gencode_flags(CUDA_ARCHS)
        return [
            CUDAExtension(
                "r1kernels._C",
                _rel(common + cpu_sources + cuda_bind + cuda_sources),
                include_dirs=[csrc],
                define_macros=[("R1K_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags + ["-DR1K_WITH_CUDA"], "nvcc": nvcc_flags},
                extra_link_args=omp_link,
            )
        ]
    return [
        CppExtension(
            "r1kernels._C",
            _rel(common + cpu_sources),
            include_dirs=[csrc],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_link,
        )
    ]


def _say(fd, text):
    os.write(fd, f"r1kernels: {text}\n".encode())


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, saying what it does: a first line with the files and the log's path,
    a line per compiled file (from ninja's [k/n] lines in the log), the time at the end."""

    def build_extensions(self):
        sources = [s for ext in self.extensions for s in ext.sources]
        n_cu = sum(s.endswith(".cu") for s in sources)
        what = f"{len(sources) - n_cu} C++ files" + (f" and {n_cu} CUDA files" if n_cu else "")
        log_path = os.path.join(ROOT, "build", "r1kernels-build.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        jobs = (f"{os.environ['MAX_JOBS']} parallel jobs (MAX_JOBS)" if os.environ.get("MAX_JOBS")
                else "ninja's number of parallel jobs (MAX_JOBS=N sets it)")
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = os.dup(1), os.dup(2)  # what pip reads; the compilers' output goes to the log
        _say(err, f"building the extension r1kernels._C: {what}, {jobs}; compiler output in "
                  f"{log_path}")
        t0 = time.monotonic()
        done = threading.Event()
        watcher = threading.Thread(target=_follow, args=(log_path, err, done), daemon=True)
        failed = True
        try:
            with open(log_path, "w") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                watcher.start()
                super().build_extensions()
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(out, 1)
            os.dup2(err, 2)
            done.set()
            if watcher.is_alive():
                watcher.join()
            if failed:
                with open(log_path, errors="replace") as f:
                    tail = f.readlines()[-60:]
                _say(err, f"the build failed; the last lines of {log_path}:")
                os.write(err, "".join(tail).encode())
            else:
                _say(err, f"r1kernels._C built in {time.monotonic() - t0:.0f} s")
            os.close(out)
            os.close(err)


def _follow(path, fd, done):
    """Print "[k/n] file" for each of ninja's progress lines ("[k/n] <compiler> ... -c <file>")
    in the log at `path`, as they are written, until `done` is set."""
    seen = 0
    while True:
        finished = done.is_set()
        with open(path, errors="replace") as f:
            lines = f.read().split("\n")
        complete = lines if finished else lines[:-1]  # the last one may be half written
        for line in complete[seen:]:
            m = re.match(r"\[(\d+)/(\d+)\] .* -c (\S+\.(?:cpp|cu))\b", line)
            if m:
                _say(fd, f"[{m.group(1)}/{m.group(2)}] compiled {os.path.relpath(m.group(3), ROOT)}")
        seen = len(complete)
        if finished:
            return
        done.wait(0.5)


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
)
