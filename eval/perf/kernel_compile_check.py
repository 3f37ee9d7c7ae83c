"""Compile every Triton kernel for a GPU on a machine without one: the check the interpreter cannot make.

    python -m eval.perf.kernel_compile_check                 # sm_90 (H100/H200), speedrun-133m shapes, bf16 and fp32
    python -m eval.perf.kernel_compile_check --arch 80 90    # also A100

The interpreter (tests/test_kernels.py) checks the kernels' math; it never lowers them to PTX, so a construct the
GPU compiler rejects, or a tile config whose pipelined buffers overflow shared memory, would first show on a GPU.
Here the real launchers run on CPU tensors with the kernels swapped for a recorder, so each launch is specialised
exactly as Triton's JIT would (dtypes, 16-byte alignment, unit strides as constants), then compiled by triton's own
bundled ptxas for the target. Prints shared memory, registers and spills per kernel and config; exits 1 if a kernel
fails to compile, a fixed-config kernel does not fit, or no config of an autotuned kernel fits.
"""

import argparse
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # interpreted kernels have no GPU source to compile
    sys.exit("kernel_compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modeling_speedplm import kernels_speedplm as K  # noqa: E402

# Shared memory a block may use (opt-in maximum), CUDA programming guide, "Technical Specifications".
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
KERNELS = ("_linear_relu2_kernel", "_qk_norm_rotary_kernel", "_xxt_kernel")


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(dtype: torch.dtype) -> list:
    """Every launch the model and Muon make for speedrun-133m (hidden 768, MLP 2048, 6 x 128 heads, 64 x 1024 tokens),
    plus the head layout and matrix size of the larger ESM2-like presets."""
    launches = []
    saved = {name: getattr(K, name) for name in KERNELS}
    saved_check = K._check_device
    try:
        for name in KERNELS:
            setattr(K, name, _Recorder(saved[name], launches))
        K._check_device = lambda t: None  # CPU tensors: only their dtype, strides and alignment matter here
        x, w = torch.empty(65536, 768, dtype=dtype), torch.empty(2048, 768, dtype=dtype)
        for save_pre in (True, False):
            K._linear_relu2_op(x, w, save_pre)
        for heads, dim in ((6, 128), (20, 64)):  # speedrun-133m; the ESM2-like presets (esm2-650m-like: 20 x 64)
            qkv = torch.empty(64, 1024, 3, heads, dim, dtype=dtype)
            q, k, _ = qkv.unbind(2)  # strided views of the fused projection, as in the model
            cos = sin = torch.empty(64, 1024, dim // 2)
            K._qk_launch(q, k, cos, sin, 1e-6)
            K._qk_launch(q, k, cos, sin, 1e-6, torch.empty_like(q), torch.empty_like(k))
        # Muon's matrices per speedrun-133m block, and one of esm2-650m-like (1280 rows: the 128-wide xxt tiles)
        for rows, cols in ((768, 768), (2048, 768), (768, 2048), (2304, 768), (1280, 5120)):
            for g in (torch.empty(rows, cols, dtype=dtype), torch.empty(24, rows, cols, dtype=dtype)):  # one, stack
                X = g.mT if rows > cols else g  # newton_schulz works on the wide orientation (a transposed view)
                A = K._xxt_op(X, 1.0, 0.0, None)
                K._xxt_op(A, -4.775, 2.0315, A)
    finally:
        for name, kernel in saved.items():
            setattr(K, name, kernel)
        K._check_device = saved_check
    return launches


def variants(kernel, args, kwargs):
    """(jit function, signature, constexprs, attrs, options) per config, specialised as Triton's JIT does."""
    configs = getattr(kernel, "configs", None)
    fn = kernel.fn if configs is not None else kernel
    params = [name for name in fn.arg_names if name not in kwargs]
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for name, value in zip(params, args):
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[name] = value
        else:
            signature[name] = kind
            attrs[(fn.arg_names.index(name),)] = BaseBackend.parse_attr(attr or "")
    options = {key: constexprs.pop(key) for key in ("num_warps", "num_stages") if key in constexprs}
    for config in configs or [None]:
        consts, opts = dict(constexprs), dict(options)
        if config is not None:
            consts.update(config.kwargs)
            opts.update(num_warps=config.num_warps, num_stages=config.num_stages)
        sig = dict(signature, **dict.fromkeys(consts, "constexpr"))
        yield fn, sig, consts, attrs, opts, config is not None


def resource_usage(compiled) -> tuple[str, str]:
    """Registers and spill bytes from the cubin (cuobjdump ships with triton's NVIDIA backend)."""
    import triton.backends.nvidia  # noqa: PLC0415

    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(tok.split(":", 1) for tok in text.split() if tok.count(":") == 1 and tok.split(":")[0].isupper())
    return fields.get("REG", "?"), fields.get("LOCAL", "?")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--shared-limit", type=int, default=None, help="bytes (default: the architecture's)")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    print("| arch | kernel | dtype | constants | warps/stages | shared B | regs | spill B | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures, fitting = [], {}  # fitting: (arch, kernel, dtype, launch) -> autotune configs that fit
    for arch in args.arch:
        target, limit = GPUTarget("cuda", arch, 32), args.shared_limit or SHARED_LIMIT.get(arch, 101_376)
        for dtype in (getattr(torch, name) for name in args.dtype):
            seen = set()
            for launch, (kernel, call_args, call_kwargs) in enumerate(record_launches(dtype)):
                for fn, sig, consts, attrs, opts, tuned in variants(kernel, call_args, call_kwargs):
                    key = (
                        fn.__name__,
                        repr(sorted(sig.items())),
                        repr(sorted(consts.items())),
                        repr(attrs),
                        repr(opts),
                    )
                    if key in seen:
                        continue
                    seen.add(key)
                    shown = {k: v for k, v in consts.items() if k.isupper()}
                    row = (
                        f"| sm_{arch} | {fn.__name__} | {str(dtype)[6:]} | {shown} | "
                        f"{opts.get('num_warps', 4)}/{opts.get('num_stages', 3)}"
                    )
                    try:
                        compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)
                    except Exception as e:  # a compile error is the finding: report it and keep going
                        failures.append(f"sm_{arch} {fn.__name__} {shown}: {type(e).__name__}: {e}"[:2000])
                        print(f"{row} | compile error | | | no |")
                        continue
                    shared = compiled.metadata.shared
                    regs, spill = resource_usage(compiled)
                    fits = shared <= limit
                    print(f"{row} | {shared} | {regs} | {spill} | {'yes' if fits else 'no'} |", flush=True)
                    if tuned:
                        fitting.setdefault((arch, fn.__name__, dtype, launch), []).append(fits)
                    elif not fits:
                        failures.append(f"sm_{arch} {fn.__name__} {shown}: {shared} B shared > {limit}")
    for (arch, name, dtype, _), fits in fitting.items():
        if not any(fits):
            failures.append(f"sm_{arch} {name} {dtype}: no autotune config fits in shared memory")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
