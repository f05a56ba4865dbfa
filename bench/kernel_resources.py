"""Every Triton kernel variant the purification loop launches, compiled ahead of time for sm_80
and sm_90 on a machine without a GPU, with the resources ptxas gives each.

    python bench/kernel_resources.py                  # -> bench/results/kernel-resources-sm80-sm90.{json,md}
    python bench/kernel_resources.py --out-dir DIR    # elsewhere (tests/test_kernel_compile.py)
    /tmp/t36/bin/python bench/kernel_resources.py --stem kernel-resources-sm80-sm90-triton3.6
        # under another Triton: a venv with only `pip install --no-deps triton==3.6.0` whose
        # site-packages has a .pth line `import site; site.addsitedir("<this repo's venv site-packages>")`

Which variants: the fused loop's own `step()` (`purify._FusedLoop`, backend "triton") runs once
for every configuration in `configurations()` (float32 and float64; linf and l2; SAM on and
off; CIFAR-10 3x32x32, ImageNet 3x256x256 and Fashion-MNIST 1x28x28 images; N = 8, 2, 1
samples) with every `@triton.jit` function of the
op modules replaced by a recorder. Each launch the launchers make is recorded with its own
arguments (tensors, ints, constexprs, options), so what is compiled is what the loop launches,
not a hand-written list; launches that Triton would specialise identically (same dtypes,
alignments, constexprs) are one variant. The other config constants that are constexprs
(betas, adam_eps, rho, the SAM radius) are PurifyConfig's defaults: another value compiles the
same code with another immediate. K does not reach a kernel, so the loop is built with K = 2.

How: `triton.compile` of each variant's `ASTSource` for `GPUTarget("cuda", 80, 32)` and
`GPUTarget("cuda", 90, 32)`, through the `ptxas` that ships in the Triton wheel (no CUDA
driver, no GPU). The resulting cubin's own resource usage (`cuobjdump -res-usage`, also in
the wheel) gives registers, stack frame, local memory and static shared memory; `ptxas -v`
on the variant's PTX gives the spill stores and loads; the dynamic shared memory is
Triton's `metadata.shared`. Occupancy is the theoretical one of the CUDA occupancy
calculator (65,536 registers per SM allocated per warp in units of 256, at most 64 warps and
32 blocks per SM, 164 KiB (sm_80) / 228 KiB (sm_90) of shared memory per SM, 1 KiB of it
reserved per block).

Also recorded per variant: the float constants of its Triton IR (TTIR) with their types, so
that a float64 variant computing in float32 anywhere (Triton 3.6 materialises a Python float
compared with a 0-d float64 value as float32 first) shows, and `tests/test_kernel_compile.py`
fails on it.

Runs in a fresh interpreter without TRITON_INTERPRET (interpreted kernels cannot be compiled;
the script removes the variable and re-executes itself if it is set).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ARCHS = (80, 90)
# Per-SM limits of the CUDA occupancy calculator: registers, warps, blocks, shared memory (bytes).
SM_LIMITS = {80: dict(regs=65536, warps=64, blocks=32, smem=164 * 1024),
             90: dict(regs=65536, warps=64, blocks=32, smem=228 * 1024)}
SHAPES = {"cifar10": (3, 32, 32), "imagenet256": (3, 256, 256), "fmnist": (1, 28, 28)}
# n_samples is a constexpr (the kernels loop over it): PurifyConfig's default 8, the shipped
# Fashion-MNIST model's 2, and 1 (the sweeps' smallest; it compiles differently: the loops
# over N vanish).
N_SAMPLES = (8, 2, 1)
DEFAULT_OUT = BENCH / "results"
STEM = "kernel-resources-sm80-sm90"


def ptxas_path(capability: int = ARCHS[0]) -> str | None:
    """The ptxas Triton's own cubin step uses for sm_<capability> (a wheel ships two: `ptxas`
    and, for newer PTX, `ptxas-blackwell`), or None when it is absent (or Triton is)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(capability).path
    except (ImportError, RuntimeError, OSError):
        return None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def missing_tools() -> str | None:
    """Why the kernels cannot be compiled here (None when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    for capability in ARCHS:
        if ptxas_path(capability) is None:
            return f"the Triton wheel has no ptxas for sm_{capability}"
    if cuobjdump_path() is None:
        return "the Triton wheel has no cuobjdump"
    return None


def ptxas_version(capability: int) -> str:
    out = subprocess.run([ptxas_path(capability), "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def configurations():
    """(label, PurifyConfig, dtype, image shape) of every loop configuration whose launches are
    recorded: dtype x norm x SAM x image shape x N, PurifyConfig's defaults otherwise, K = 2."""
    import torch

    from pursamere_fast import PurifyConfig

    out = []
    for dtype in (torch.float32, torch.float64):
        for norm in ("linf", "l2"):
            for sam in (False, True):
                for shape_name, shape in SHAPES.items():
                    for n in N_SAMPLES:
                        config = PurifyConfig(norm=norm, sigmas=(0.5, 0.1), steps_per_sigma=1, max_batch=1,
                                              n_samples=n, **({} if sam else dict(sam_radius=0.0)))
                        label = (f"{str(dtype).replace('torch.', '')} {norm} sam={'on' if sam else 'off'} "
                                 f"{shape_name} N={n}")
                        out.append((label, config, dtype, shape))
    return out


@contextlib.contextmanager
def recording(launches: list):
    """Replace every `@triton.jit` function of the op modules by a recorder of launches, and the
    launchers' device gate by a no-op (the loop's tensors are on the CPU); restore both after."""
    import importlib
    import pkgutil

    import triton

    from pursamere_fast import kernels

    class Recorder:
        def __init__(self, module, name, fn):
            self.module, self.name, self.fn = module, name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(dict(module=self.module.__name__, kernel=self.name, grid=grid, args=args,
                                     kwargs=kwargs))
            return launch

    saved = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        if not hasattr(module, "require_triton") or info.name == "common":
            continue
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction):
                saved.append((module, name, value))
        saved.append((module, "require_triton", module.require_triton))
    try:
        for module, name, value in saved:
            setattr(module, name, Recorder(module, name, value) if name != "require_triton" else (lambda device: None))
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def record_launches() -> list[dict]:
    """Every kernel launch of one loop step per configuration, with the configuration's label."""
    import torch

    from pursamere_fast.purify import _FusedLoop

    def score(y, sigma):
        return -y / sigma.view(-1, 1, 1, 1) ** 2

    launches = []
    for label, config, dtype, shape in configurations():
        loop = _FusedLoop(score, config, (1, *shape), dtype, torch.device("cpu"), "triton")
        noise = torch.zeros(config.num_steps, config.n_samples, *shape, dtype=dtype)
        loop.load(torch.full((1, *shape), 0.5, dtype=dtype), noise)
        start = len(launches)
        with recording(launches):
            loop.step()
        for launch in launches[start:]:
            launch["config"] = label
    return launches


def _specialise(launch, backend):
    """Triton's own binding of a launch's arguments: (options, signature, constexprs, attrs, key)."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch["fn"]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch["args"], **launch["kwargs"])
    options, signature, constexprs, attrs = fn._pack_args(backend, launch["kwargs"], bound, specialization, options)
    key = (launch["kernel"], repr(specialization), repr(sorted(options.__dict__.items())))
    return options, signature, constexprs, attrs, key


def variants(launches: list[dict]) -> list[dict]:
    """The distinct compilations among the launches, each with the configurations launching it."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", ARCHS[0], 32))
    out = {}
    for launch in launches:
        launch["fn"] = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        *_, constexprs, _, key = _specialise(launch, backend)
        if key not in out:
            names = list(launch["fn"].signature.parameters)
            dtypes = sorted({str(a.dtype).replace("torch.", "") for a in launch["args"] if hasattr(a, "dtype")})
            out[key] = dict(launch=launch, kernel=launch["kernel"], dtype="/".join(dtypes), configs=[],
                            constexprs={names[path[0]]: value for path, value in constexprs.items()})
        out[key]["configs"].append(launch["config"])
    return list(out.values())


def cuobjdump_path() -> str | None:
    """The cuobjdump of the installed Triton wheel, or None."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def ptxas_spills(ptx: str, capability: int, fp_fusion: bool) -> dict:
    """Spill stores and loads in bytes, from `ptxas -v` on the variant's PTX (the ptxas and the
    options Triton's cubin step passes that change code generation: arch and --fmad)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas_path(capability), *([] if fp_fusion else ["--fmad=false"]), "-v",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    stores, loads = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)[0]
    return dict(spill_stores=int(stores), spill_loads=int(loads))


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack, local and static shared memory per thread/block of a compiled cubin
    (`cuobjdump -res-usage`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([cuobjdump_path(), "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in usage:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[:500]!r}")
    return dict(registers=int(usage["REG"]), stack=int(usage["STACK"]), local=int(usage["LOCAL"]),
                static_smem=int(usage["SHARED"]))


def spills(row: dict) -> bool:
    """Whether a compiled variant spills registers (ptxas's count) or uses local memory."""
    return bool(row["spill_stores"] or row["spill_loads"] or row["local"])


def occupancy(capability: int, registers: int, smem: int, num_warps: int) -> dict:
    """Theoretical blocks per SM and occupancy (active warps / 64) from registers, shared memory and warps."""
    lim = SM_LIMITS[capability]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem"] // (smem + 1024)
    blocks = min(lim["blocks"], by_regs, by_warps, by_smem)
    limiter = min((("registers", by_regs), ("warps", by_warps), ("shared memory", by_smem), ("blocks", lim["blocks"])),
                  key=lambda t: t[1])[0]
    return dict(blocks_per_sm=blocks, occupancy=blocks * num_warps / lim["warps"], occupancy_limited_by=limiter)


_CONST = re.compile(r"arith\.constant (?:dense<)?([-+0-9.eEx]+|0x[0-9A-Fa-f]+)>? : "
                    r"(?:tensor<[^>]*x)?(f16|bf16|f32|f64)")


def float_constants(ttir: str) -> list[tuple[str, float]]:
    """(type, value) of every float constant of a TTIR module (MLIR prints a value that does not
    round-trip in decimal as its bits in hex)."""
    import struct

    out = []
    for text, ty in _CONST.findall(ttir):
        if text.lower().startswith("0x"):
            bits = int(text, 16)
            value = struct.unpack("<d", bits.to_bytes(8, "little"))[0] if ty == "f64" else \
                struct.unpack("<f", bits.to_bytes(4, "little"))[0] if ty == "f32" else float("nan")
        else:
            value = float(text)
        out.append((ty, value))
    return sorted(set(out))


# Float constants a kernel may compare with or floor at besides its float constexprs.
FLOORS = (1e-12,)


def float32_leaks(row: dict) -> list[str]:
    """What in a float64 variant's TTIR was computed in float32: a float32 constant, or a float64
    constant that is the float32 rounding of one of its config constants (a float constexpr,
    1 - beta, or a floor) that float32 does not hold exactly. Empty for float32 variants."""
    import numpy as np

    if row["dtype"] != "float64":
        return []
    exact = [v for v in row["constexprs"].values() if isinstance(v, float)]
    exact += [1 - v for k, v in row["constexprs"].items() if k.startswith("BETA")] + list(FLOORS)
    # A rounding that lands on a value the kernel uses anyway (the clamp's 0 and 1) proves nothing.
    rounded = {float(np.float32(v)): v for v in exact
               if float(np.float32(v)) != v and float(np.float32(v)) not in {*exact, 0.0, 1.0}}
    out = [f"float32 constant {value!r}" for ty, value in row["ttir_float_constants"] if ty != "f64"]
    out += [f"float64 constant {value!r} is float32({rounded[value]!r})"
            for ty, value in row["ttir_float_constants"] if ty == "f64" and value in rounded]
    return out


def compile_variant(variant: dict, capability: int) -> dict:
    """Compile one variant for sm_<capability> to a cubin; its resources and TTIR constants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs, _ = _specialise(variant["launch"], backend)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(variant["launch"]["fn"], signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    wall = time.perf_counter() - t0
    assert compiled.asm.get("cubin"), "no cubin"
    meta = compiled.metadata
    res = cubin_resources(compiled.asm["cubin"])
    res.update(ptxas_spills(compiled.asm["ptx"], capability, options.enable_fp_fusion))
    smem = meta.shared + res["static_smem"]
    return dict(arch=f"sm_{capability}", num_warps=meta.num_warps, shared_bytes=smem, **res,
                **occupancy(capability, res["registers"], smem, meta.num_warps), cubin_bytes=len(compiled.asm["cubin"]),
                compile_s=round(wall, 2), ttir_float_constants=float_constants(compiled.asm["ttir"]))


def build(archs=ARCHS) -> dict:
    """The whole table: environment, recorded configurations, one row per (variant, arch)."""
    import torch
    import triton

    launches = record_launches()
    found = variants(launches)
    rows = []
    for variant in found:
        for capability in archs:
            row = dict(kernel=variant["kernel"], dtype=variant["dtype"], constexprs=variant["constexprs"],
                       configs=variant["configs"])
            try:
                row.update(compile_variant(variant, capability))
            except Exception as exc:  # one failure must not hide the others: the test reports them all
                row.update(arch=f"sm_{capability}", error=f"{type(exc).__name__}: {exc}"[:2000])
            rows.append(row)
    return dict(
        command="python bench/kernel_resources.py",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                      ptxas={f"sm_{c}": ptxas_version(c) for c in archs}),
        configurations=[label for label, *_ in configurations()],
        launches_per_configuration={label: sum(1 for launch in launches if launch["config"] == label)
                                    for label, *_ in configurations()},
        rows=rows,
    )


def markdown(doc: dict) -> str:
    """The table as markdown, one line per (variant, arch)."""
    lines = ["# Triton kernel resources, sm_80 and sm_90 (ahead of time, no GPU)", "",
             f"`{doc['command']}`, {doc['date']}: triton {doc['versions']['triton']}, "
             f"torch {doc['versions']['torch']}, ptxas "
             + "; ".join(f"{arch}: {v}" for arch, v in doc["versions"]["ptxas"].items()) + ".", "",
             f"Variants: every distinct compilation among the launches of one loop step in each of "
             f"{len(doc['configurations'])} configurations (float32/float64 x linf/l2 x SAM on/off x "
             "CIFAR-10 3x32x32 / ImageNet 3x256x256 / Fashion-MNIST 1x28x28 x N = 8, 2, 1; "
             "`bench/kernel_resources.py`). spill st/ld: ptxas -v; local, "
             "stack: bytes per thread in the cubin (cuobjdump). Occupancy: theoretical, from registers, shared memory "
             "and warps.", "",
             "| kernel | dtype | constexprs | arch | regs | spill st/ld (B) | local (B) | stack (B) | smem (B) | "
             "warps | blocks/SM | occupancy | launched by |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in doc["rows"]:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        by = f"{len(r['configs'])} configs"
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {cx} | {r['arch']} | FAILED: {r['error'][:200]} "
                         f"| | | | | | | | {by} |")
            continue
        lines.append(f"| {r['kernel']} | {r['dtype']} | {cx} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['local']} | {r['stack']} | {r['shared_bytes']} | "
                     f"{r['num_warps']} | "
                     f"{r['blocks_per_sm']} | {r['occupancy']:.2f} ({r['occupancy_limited_by']}) | {by} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT))
    parser.add_argument("--stem", default=STEM, help=f"output file names without suffix (default {STEM})")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        sys.exit(subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:])], env=env).returncode)
    missing = missing_tools()
    if missing:
        sys.exit(f"cannot compile ahead of time here: {missing}")
    doc = build()
    if args.stem != STEM:
        doc["command"] += f" --stem {args.stem}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stem}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{args.stem}.md").write_text(markdown(doc))
    bad = [r for r in doc["rows"] if "error" in r or spills(r)]
    print(f"{len(doc['rows'])} compilations, {len(bad)} failed or spilling; wrote {path}")
    return path


if __name__ == "__main__":
    main()
