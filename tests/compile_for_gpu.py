"""Compile decode-kernel variants for a Hopper GPU (sm_90) without one: Triton's compiler, not its interpreter.

Reads a JSON list of launches on stdin, each ``{"kernel": name in ops.decode_kernels, "signature": {argument: Triton
type}, "constexprs": {argument: value}, "divisible": [arguments that are multiples of 16], "options": {num_warps,
...}}``, and compiles each to a cubin, specialised as Triton's launcher would; exits nonzero on the first that
fails. Where that Triton builds a C launcher per variant, also checks that the launcher source compile-ahead builds
beside a compilation is the one Triton's loader builds for the compiled kernel (the same source is the same cache
entry); the C compiler is not run. Run by ``test_ops.test_decode_kernels_compile_for_hopper`` in a process without
``TRITON_INTERPRET``, so the kernels are defined as compilable functions.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bettertransformer.ops import compile_ahead, decode_kernels


def launcher_sources(source: ASTSource, compiled: object) -> tuple[str, str] | None:
    """(the launcher source compile-ahead builds for ``source``, the one Triton's loader builds for ``compiled``),
    captured instead of compiled; None where this Triton builds no launcher per variant."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import build as runtime_build

    sources: list[str] = []
    saved = nvidia.compile_module_from_src, runtime_build.compile_module_from_src, nvidia.library_dirs
    try:
        nvidia.compile_module_from_src = runtime_build.compile_module_from_src = (
            lambda src, name, **kwargs: sources.append(src) or type("Module", (), {"launch": None})
        )
        nvidia.library_dirs = lambda: []  # no libcuda on a machine without a GPU; not used by the source
        ahead = compile_ahead._launcher_builder()
        if ahead is None:
            return None
        ahead(source)
        nvidia.CudaLauncher(source, compiled.metadata)
    finally:
        nvidia.compile_module_from_src, runtime_build.compile_module_from_src, nvidia.library_dirs = saved
    if len(sources) == 1:  # compile-ahead leaves a launcher taking TMA descriptors to the loader
        return None
    return sources[0], sources[1]


def main() -> None:
    launches = json.load(sys.stdin)
    checked = 0
    for launch in launches:
        kernel = getattr(decode_kernels, launch["kernel"])
        constexprs = {(kernel.arg_names.index(name),): value for name, value in launch["constexprs"].items()}
        signature = {**launch["signature"], **dict.fromkeys(launch["constexprs"], "constexpr")}
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in launch["divisible"]}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception:
            print(f"failed: {launch['kernel']} {launch['constexprs']}", file=sys.stderr)
            raise
        pair = launcher_sources(source, compiled)
        if pair is not None:
            assert pair[0] == pair[1], f"{launch['kernel']}: the launcher built ahead differs from the loader's"
            checked += 1
    print(f"compiled {len(launches)} variants with triton {triton.__version__} ({checked} launchers checked)")


if __name__ == "__main__":
    main()
