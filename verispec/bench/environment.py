"""What the numbers were measured on: CPU, cores, threads, versions, commit, load, memory."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .. import huge_pages
from .peers import llama_cpp_env

BUSY_LOAD = 0.5  # a load average above this before the run means the numbers may be skewed

PACKAGES = ("verispec", "llama-cpp-python", "torch", "transformers", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit of the checkout verispec runs from, with '-dirty' if it has local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def memory() -> dict[str, int]:
    """This process's peak (VmHWM) and current (VmRSS) resident memory, in bytes, from /proc/self/status,
    and how much of its anonymous memory is on huge pages (AnonHugePages)."""
    out = {"AnonHugePages": huge_pages.backed_bytes()}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def describe(threads: int | None) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "commit": git_commit(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "huge_pages": {"requested": huge_pages.requested(), "thp_mode": huge_pages.thp_mode(),
                       "peers": huge_pages.requested(llama_cpp_env())},
    }
