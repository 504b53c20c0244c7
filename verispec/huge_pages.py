"""Huge pages for the weights a CPU pass streams, set up once per process, before it starts.

A one-row pass of the Qwen2.5 1.5B Q4_K_M target reads about 1 GB of weights. llama.cpp copies most of
them into its repacked CPU buffer (~600 MB, `posix_memalign`, so glibc maps it anonymously), and with the
kernel's transparent huge pages in `madvise` mode (the common default, and this project's machines) that
memory is backed by 4 KiB pages unless someone asks. `glibc.malloc.hugetlb=1` makes glibc ask
(`madvise(MADV_HUGEPAGE)`) for every chunk it maps.

Measured on this project's machines (2 threads, Qwen2.5 1.5B, one-row passes at ~100 tokens of context,
3 runs each, 2026-12-06): 67.1-68.1 ms per pass without, 62.1-62.9 ms with (7-8% faster); llama.cpp's
own `llama-bench` gains the same (15.0 -> 15.9 tokens/s).

glibc reads the tunable once, when the process starts, and the kernel here has no `MADV_COLLAPSE` to
convert pages already mapped. So the `verispec` command starts itself again with the tunable set
(`reexec_with_huge_pages`) before it imports anything heavy, and the Makefile exports it. A program that
imports verispec as a library sets it itself: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python app.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None where there is none."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def requested(env: dict[str, str] | None = None) -> bool:
    """Whether glibc was told to ask for huge pages in this environment."""
    env = os.environ if env is None else env
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def with_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """`env` with the tunable added to any others it holds."""
    if requested(env):
        return dict(env)
    others = env.get("GLIBC_TUNABLES", "")
    return {**env, "GLIBC_TUNABLES": f"{others}:{TUNABLE}" if others else TUNABLE}


def without_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """`env` without the tunable (llama.cpp's own programs in the bench run as users run them)."""
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
    out = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    if kept:
        out["GLIBC_TUNABLES"] = ":".join(kept)
    return out


def worth_restarting() -> bool:
    """True where a restart with the tunable would change the pages: Linux with glibc, huge pages in
    `madvise` mode ("always" needs no asking, "never" grants none), not yet requested, not switched off
    (VERISPEC_HUGE_PAGES=0)."""
    if os.environ.get("VERISPEC_HUGE_PAGES", "1") == "0" or requested():
        return False
    if not sys.platform.startswith("linux") or not _glibc():
        return False
    return thp_mode() == "madvise"


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


def reexec_with_huge_pages() -> None:
    """Start this command again with the tunable set, where that helps (see the module docstring).

    Call it first thing in a command's entry point: it replaces the process, and costs one interpreter start.
    """
    if not worth_restarting():
        return
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], with_huge_pages(dict(os.environ)))
    except OSError:
        return  # the command runs on as it is, with glibc's default pages


def backed_bytes() -> int:
    """Bytes of this process's anonymous memory on huge pages (AnonHugePages), 0 where unknown."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
