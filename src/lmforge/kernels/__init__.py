"""lmforge's own CPU kernels (C++: every ``*.cpp`` beside this file), built on first use for the machine at hand.

What they are for: decoding one new token per row, where eager PyTorch spends more on dispatching small
operations and on its int8/int4 kernels' slow streaming than on arithmetic: ``torch.ops.lmforge.int8_linear``
and ``int4_linear`` (weight-only int8 / int4 over a few rows, used by :class:`lmforge.models.quant.QuantLinear`;
int4 where the CPU has AVX512-VNNI, :func:`int4_native`), ``attend_one``, ``rms_norm``, ``silu_mul`` (a
Transformer block's step, :meth:`lmforge.models.layers.Block._step`) and ``decode_stack`` (every block's step in
one call, ``GPT._decode_stack``); and
training steps, where eager autograd makes several passes over memory for what is one: ``causal_attention``
(train_ops.cpp), RMSNorm's and SwiGLU's backwards and LoRA's dropout with the adapters' A product,
``lora_dropout_a`` (block_ops.cpp; used by :class:`lmforge.models.layers.RMSNorm`, ``MLP`` and
:mod:`lmforge.models.lora`). Each C++ file's header says what its ops compute.

How they are built: ``g++ -O3 -march=native`` against the installed torch's headers and libraries (its
bundled OpenMP runtime, so the kernels share PyTorch's threads), once per machine: the library is cached
under ``~/.cache/lmforge/kernels/<key>/`` where the key hashes the source, torch's version and this CPU's
model and flags, so a new CPU, torch or source builds again (~15 s, said on stderr). Without a C++ compiler,
when the build fails, or with ``LMFORGE_KERNELS=0``, lmforge says so once and decodes with PyTorch's
operations (the same results up to rounding, slower).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..utils import atomic_write, cache_root, cpu_info

#: the C++ sources, compiled together into one library (one ``TORCH_LIBRARY(lmforge)``, the others fragments)
SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))
#: headers the sources include (part of the build's cache key)
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
#: the CPU the kernels are compiled for: this one (``native``), unless ``LMFORGE_KERNELS_MARCH`` names another
#: (e.g. ``haswell`` for the AVX2 bodies, ``x86-64`` for the plain C++ ones: how the tests reach them)
MARCH = os.environ.get("LMFORGE_KERNELS_MARCH", "native")
BUILD_FLAGS = ("-O3", f"-march={MARCH}", "-fopenmp", "-fPIC", "-shared", "-std=c++20")
BUILD_TIMEOUT_S = 600


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)


def library_path() -> Path:
    """Where this machine's build of the kernels lives (built or not)."""
    model, flags = cpu_info()
    text = b"".join(s.name.encode() + b"\0" + s.read_bytes() for s in SOURCES + HEADERS)
    key = hashlib.sha256(text + f"|{torch.__version__}|{model}|{sorted(flags)}|{BUILD_FLAGS}".encode()).hexdigest()[:16]
    return cache_root() / "kernels" / key / "lmforge_ops.so"


def _build(out: Path, cxx: str) -> None:
    """Compile each source to an object file, all at once (one compiler process per source: the sources build in
    parallel on the machine's cores), link them into a temporary file beside ``out`` and move it in place
    (utils.atomic_write): concurrent processes each build and the last rename wins, a killed build leaves nothing
    half-written behind."""
    torch_dir = Path(torch.__file__).parent
    includes = [f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}"]

    def check(done: subprocess.CompletedProcess) -> None:
        if done.returncode != 0:
            last = [line for line in done.stderr.splitlines() if "error" in line][:1] or done.stderr.splitlines()[-1:]
            raise RuntimeError(last[0] if last else f"{cxx} exited with {done.returncode}")

    def compile_to(tmp: str) -> None:
        objects = [f"{tmp}.{src.stem}.o" for src in SOURCES]
        jobs: list[subprocess.Popen] = []
        try:
            jobs = [subprocess.Popen([cxx, *BUILD_FLAGS, *includes, "-c", str(src), "-o", obj], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    for src, obj in zip(SOURCES, objects)]
            for job in jobs:
                stdout, stderr = job.communicate(timeout=BUILD_TIMEOUT_S)
                check(subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr))
            check(subprocess.run([cxx, *BUILD_FLAGS, *objects, "-o", tmp, f"-L{torch_dir / 'lib'}", "-lc10",
                                  "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"],
                                 capture_output=True, text=True, timeout=BUILD_TIMEOUT_S))
        finally:
            for job in jobs:  # after a failure, the other compilers stop too
                if job.poll() is None:
                    job.kill()
                    job.wait()
            for obj in objects:
                Path(obj).unlink(missing_ok=True)

    atomic_write(out, compile_to)


def _note(text: str) -> None:
    print(f"lmforge: {text}", file=sys.stderr, flush=True)


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant, not tracing the build
def available() -> bool:
    """Whether ``torch.ops.lmforge`` is loaded (building it first if this machine has no build yet)."""
    return _load()


@functools.cache  # once per process
def _load() -> bool:
    if os.environ.get("LMFORGE_KERNELS", "1") in ("0", "false", "no", "off"):
        return False
    try:
        path = library_path()
        if not path.exists():
            cxx = _compiler()
            if cxx is None:
                _note("no C++ compiler (g++): decoding with PyTorch's operations, slower; install g++ for "
                      "lmforge's kernels")
                return False
            _note(f"building lmforge's CPU kernels for this machine (once, ~15 s) into {path.parent}")
            _build(path, cxx)
        torch.ops.load_library(str(path))
        _register_fakes()
        _register_autograd()
        return True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _note(f"lmforge's CPU kernels are not available ({e}); decoding with PyTorch's operations, slower "
              "(LMFORGE_KERNELS=0 silences this)")
        return False


def _register_fakes() -> None:
    """Shapes for ``torch.compile`` (a compiled decode step or fine-tuning block traces through these ops without
    running them)."""

    @torch.library.register_fake("lmforge::int8_linear")
    def _int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype | None = None
              ) -> torch.Tensor:
        return x.new_empty(x.shape[0], q.shape[0], dtype=out_dtype or x.dtype)

    @torch.library.register_fake("lmforge::tiled_linear")
    def _tiled(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype or x.dtype)

    @torch.library.register_fake("lmforge::int4_linear")
    def _int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0], dtype=out_dtype or x.dtype)

    @torch.library.register_fake("lmforge::rms_norm")
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("lmforge::silu_mul")
    def _silu(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

    @torch.library.register_fake("lmforge::causal_attention")
    def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cos: torch.Tensor | None,
                sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = q.shape
        return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.register_fake("lmforge::causal_attention_backward")
    def _causal_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, scale: float, cos: torch.Tensor | None,
                    sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (B, H, T, D), Hkv = q.shape, k.shape[1]
        return (q.new_empty(B, T, H, D).transpose(1, 2), k.new_empty(B, T, Hkv, D).transpose(1, 2),
                k.new_empty(B, T, Hkv, D).transpose(1, 2))

    @torch.library.register_fake("lmforge::attend_one")
    def _attend(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, row_pos: torch.Tensor | None,
                cos: torch.Tensor | None, sin: torch.Tensor | None, n_head: int, n_kv_head: int) -> torch.Tensor:
        return qkv.new_empty(k.shape[0], n_head * k.shape[-1])

    @torch.library.register_fake("lmforge::lora_dropout_a")
    def _lora_a(x: torch.Tensor, a: torch.Tensor, n: int, p: float, seed: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], a.shape[0])

    @torch.library.register_fake("lmforge::lora_dropout_a_backward")
    def _lora_a_bwd(dh: torch.Tensor, x: torch.Tensor, a: torch.Tensor, n: int, p: float,
                    seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(x), torch.empty_like(a)

    @torch.library.register_fake("lmforge::silu_mul_backward")
    def _silu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("lmforge::rms_norm_backward")
    def _rms_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float,
                 weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(x), torch.empty_like(w)

    @torch.library.register_fake("lmforge::dropout_keep")
    def _keep(seed: torch.Tensor, n: int, rows: int, cols: int, p: float) -> torch.Tensor:
        return seed.new_empty(n, rows, cols, dtype=torch.bool)


def _register_autograd() -> None:
    """Backwards for training: ``causal_attention``'s is its own kernel, fed with what the forward saved (P is
    recomputed); ``lora_dropout_a``'s is its own op (the masks drawn again from the seed: nothing else saved);
    ``rms_norm``'s is ``rms_norm_backward`` (the row scale computed again from x), ``silu_mul``'s
    ``silu_mul_backward``."""

    def setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        q, k, v, scale, cos, sin = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, cos, sin)
        ctx.scale = scale

    def backward(ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor, _dlse: torch.Tensor) -> tuple:
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        return (*torch.ops.lmforge.causal_attention_backward(do, q, k, v, o, lse, ctx.scale, cos, sin), None, None,
                None)

    torch.library.register_autograd("lmforge::causal_attention", backward, setup_context=setup)

    def lora_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        x, a, n, p, seed = inputs
        ctx.save_for_backward(x, a, seed)
        ctx.n, ctx.p = n, p

    def lora_backward(ctx: torch.autograd.function.FunctionCtx, dh: torch.Tensor) -> tuple:
        x, a, seed = ctx.saved_tensors
        dx, da = torch.ops.lmforge.lora_dropout_a_backward(dh, x, a, ctx.n, ctx.p, seed)
        return dx, da, None, None, None

    torch.library.register_autograd("lmforge::lora_dropout_a", lora_backward, setup_context=lora_setup)

    def rms_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        x, w, eps = inputs
        ctx.save_for_backward(x, w)
        ctx.eps = eps

    def rms_backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        dx, dw = torch.ops.lmforge.rms_norm_backward(dy, x, w, ctx.eps, ctx.needs_input_grad[1])
        return dx, dw if ctx.needs_input_grad[1] else None, None

    torch.library.register_autograd("lmforge::rms_norm", rms_backward, setup_context=rms_setup)

    def silu_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    def silu_backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> torch.Tensor:
        return torch.ops.lmforge.silu_mul_backward(dy, ctx.saved_tensors[0])

    torch.library.register_autograd("lmforge::silu_mul", silu_backward, setup_context=silu_setup)


def usable(device: torch.device, in_compiled_graphs: bool = False) -> bool:
    """Whether a training op on ``device`` can take lmforge's kernels (with their backwards): on the CPU, where
    they are built; in eager mode only (a compiled graph fuses its own elementwise ops) unless
    ``in_compiled_graphs`` (attention: one op that Inductor would not do better). The dtypes an op takes are
    its caller's to check."""
    return device.type == "cpu" and (in_compiled_graphs or not torch.compiler.is_compiling()) and available()


#: head sizes ``causal_attention`` is compiled for
CAUSAL_HEAD_DIMS = (16, 32, 64, 128)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal softmax attention of q (B, H, T, D) over k, v (B, H_kv, T, D), fp32 or bf16, differentiable, with q
    and k first rotated by RoPE when ``rope`` = (cos, sin), each (T, D); the output is (B, H, T, D) in q's dtype,
    laid out as (B, T, H, D). Call only when :func:`available` (train_ops.cpp says how and why)."""
    cos, sin = rope if rope is not None else (None, None)
    return torch.ops.lmforge.causal_attention(q, k, v, q.shape[-1] ** -0.5, cos, sin)[0]


@functools.cache
def int4_native() -> bool:
    """Whether lmforge's int4 kernel runs its AVX512-VNNI body here (models/quant.py keeps PyTorch's int4 kernel
    elsewhere: lmforge's plain loop is correct but slow)."""
    return available() and bool(torch.ops.lmforge.int4_native())


def int8_vnni() -> bool:
    """Whether lmforge's int8 kernel has its AVX512-VNNI body here (integer dot products with the activations
    quantised per 64 inputs; models/quant.py then lays int8 weights out for it, the bf16 tiles elsewhere).
    ``LMFORGE_INT8_VNNI=0`` keeps the bf16 tiles (weight-only int8, the activations unrounded)."""
    if os.environ.get("LMFORGE_INT8_VNNI", "1") in ("0", "false", "no", "off"):
        return False
    return available() and bool(torch.ops.lmforge.int8_vnni())


def isa() -> str:
    """The instruction set the kernels were built for ("avx512", "avx2" or "scalar"); "" when not built."""
    return torch.ops.lmforge.isa() if available() else ""
