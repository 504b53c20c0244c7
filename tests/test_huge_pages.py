"""Huge pages for llama.cpp's buffers: the tunable is added and removed without touching others, the
`verispec` command restarts itself with it, llama.cpp's own programs in the bench run without it, and a
model's buffers land on huge pages when it is set."""

import os
import subprocess
import sys

import pytest

from verispec import huge_pages
from verispec.bench.peers import llama_cpp_env

PRINT_TUNABLES = "import os; from verispec.huge_pages import reexec_with_huge_pages as r; r(); print(os.environ.get('GLIBC_TUNABLES'))"
madvise_mode = pytest.mark.skipif(huge_pages.thp_mode() != "madvise", reason="transparent huge pages are not in madvise mode here")


def test_tunable_added_and_removed_beside_others():
    env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.check=0"}
    on = huge_pages.with_huge_pages(env)
    assert on["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert huge_pages.requested(on) and not huge_pages.requested(env)
    assert huge_pages.with_huge_pages(on) == on
    assert huge_pages.without_huge_pages(on) == env
    assert huge_pages.without_huge_pages(huge_pages.with_huge_pages({"PATH": "/bin"})) == {"PATH": "/bin"}


def _run(code: str, **env_changes: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VERISPEC_HUGE_PAGES")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@madvise_mode
def test_command_restarts_itself_with_the_tunable_unless_switched_off():
    assert _run(PRINT_TUNABLES) == "glibc.malloc.hugetlb=1"
    assert _run(PRINT_TUNABLES, GLIBC_TUNABLES="glibc.malloc.check=0") == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert _run(PRINT_TUNABLES, VERISPEC_HUGE_PAGES="0") == "None"


def test_llama_cpp_programs_run_without_it(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.hugetlb=1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = llama_cpp_env()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0" and "OMP_WAIT_POLICY" not in env
    monkeypatch.setenv("VERISPEC_PEER_HUGE_PAGES", "1")  # like with like, when asked
    assert huge_pages.requested(llama_cpp_env())


@madvise_mode
def test_model_buffers_land_on_huge_pages_only_when_asked(smol_source):
    load = ("from verispec.huge_pages import backed_bytes; from verispec.runners.llamacpp import LlamaCppRunner; "
            "from verispec.models import files; r = LlamaCppRunner(files.resolve('smollm2-135m')); "
            "r.forward(r.tokenizer.encode('Hello there'), all_logits=False); print(backed_bytes())")
    assert int(_run(load, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")) >= 32 << 20
    assert int(_run(load)) < 32 << 20
