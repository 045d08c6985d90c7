"""Compile decode-kernel variants for a Hopper GPU (sm_90) without one: Triton's compiler, not its interpreter.

Reads a JSON list of launches on stdin, each ``{"kernel": name in ops.decode_kernels, "signature": {argument: Triton
type}, "constexprs": {argument: value}, "divisible": [arguments that are multiples of 16], "options": {num_warps,
...}}``, and compiles each to a cubin, specialised as Triton's launcher would; exits nonzero on the first that
fails. Run by ``test_ops.test_decode_kernels_compile_for_hopper`` in a process without
``TRITON_INTERPRET``, so the kernels are defined as compilable functions.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bettertransformer.ops import decode_kernels


def main() -> None:
    launches = json.load(sys.stdin)
    for launch in launches:
        kernel = getattr(decode_kernels, launch["kernel"])
        constexprs = {(kernel.arg_names.index(name),): value for name, value in launch["constexprs"].items()}
        signature = {**launch["signature"], **dict.fromkeys(launch["constexprs"], "constexpr")}
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in launch["divisible"]}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception:
            print(f"failed: {launch['kernel']} {launch['constexprs']}", file=sys.stderr)
            raise
    print(f"compiled {len(launches)} variants with triton {triton.__version__}")


if __name__ == "__main__":
    main()
