#!/usr/bin/env bash
# Builds llama.cpp for verispec from the llama-cpp-python sdist that pyproject.toml pins, into a cache
# folder outside the repository (never commit binaries).
#
#   llama-cpp.sh wheel   the binding's wheel: vendored llama.cpp with PATCHES (ggml-fa-split-kv-env.patch: see
#                        docs/threading.md; ggml-batch-invariant.patch: every pass of 1-64 rows gives each row
#                        its one-row bits, see docs/batch-invariance.md), GGML_OPENMP=OFF (ggml's own threads,
#                        which exist only during a pass), and only what the binding loads: no multimodal
#                        library (LLAVA_BUILD=OFF), no llama.cpp `common` library. Prints its path.
#   llama-cpp.sh tools   llama.cpp's own programs, unpatched and with its default OpenMP build, as the
#                        bench's peers: llama-server, llama-speculative-simple, llama-lookup (the ones
#                        verispec/bench runs). Prints their folder.
#
# Each result is keyed by what went into it, so a changed patch or flag builds anew and a rerun is free.
set -euo pipefail
VERSION=0.3.36
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${VERISPEC_CACHE:-$HOME/.cache/verispec}/llama.cpp"
PYTHON="${PYTHON:-python3}"
WHEEL_CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF"
PATCHES="ggml-fa-split-kv-env.patch ggml-batch-invariant.patch"
# AMX left out of every build: on this project's machines (Intel Xeon with AMX, under Firecracker) ggml's AMX
# matmul dies with a general protection fault at its first ldtilecfg, although the kernel grants the tiles.
# GCC keeps explicit -mno-* flags over what -march=native turns on.
export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
TOOLS="llama-server llama-speculative-simple llama-lookup"
mkdir -p "$CACHE"

sdist() {
    local archive="$CACHE/llama_cpp_python-$VERSION.tar.gz"
    if [ ! -f "$archive" ]; then
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" >&2
    fi
    echo "$archive"
}

key() {  # what a build depends on, hashed: the version, the arguments given, the compiler flags, the machine
    { echo "$VERSION"; echo "$*"; echo "$CFLAGS"; uname -m; } | sha256sum | cut -c1-12
}

build_wheel() {
    local out="$CACHE/wheel-$(key "$WHEEL_CMAKE_ARGS" no-common "$(cd "$HERE" && cat $PATCHES)")"
    if ! ls "$out"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        local src; src="$(mktemp -d)"
        tar xzf "$(sdist)" -C "$src"
        for p in $PATCHES; do (cd "$src/llama_cpp_python-$VERSION" && patch -p1 --quiet < "$HERE/$p"); done
        # llama-cpp-python forces llama.cpp's `common` library on (its CMakeLists.txt), which only tools use
        sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE/set(LLAMA_BUILD_COMMON OFF CACHE/' "$src/llama_cpp_python-$VERSION/CMakeLists.txt"
        echo "building the llama-cpp-python wheel (about 5 minutes on 2 cores) ..." >&2
        mkdir -p "$out.tmp"
        CMAKE_ARGS="$WHEEL_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "$PYTHON" -m pip wheel --quiet --no-deps -w "$out.tmp" "$src/llama_cpp_python-$VERSION" >&2
        rm -rf "$out" && mv "$out.tmp" "$out" && rm -rf "$src"
    fi
    ls "$out"/llama_cpp_python-*.whl
}

build_tools() {
    local out="$CACHE/tools-$(key tools)"
    if [ ! -x "$out/bin/llama-server" ]; then
        local src; src="$(mktemp -d)"
        tar xzf "$(sdist)" -C "$src"
        echo "building llama.cpp's own tools (about 10 minutes on 2 cores) ..." >&2
        cmake -S "$src/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
            -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF >&2
        cmake --build "$src/build" -j"$(nproc)" --target $TOOLS >&2
        mkdir -p "$out.tmp/bin" && for t in $TOOLS; do cp "$src/build/bin/$t" "$out.tmp/bin/"; done
        rm -rf "$out" && mv "$out.tmp" "$out" && rm -rf "$src"
    fi
    echo "$out/bin"
}

case "${1:-}" in
    wheel) build_wheel ;;
    tools) build_tools ;;
    *) echo "usage: $0 wheel|tools" >&2; exit 2 ;;
esac
