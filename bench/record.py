"""Run the NCSNv2 purify benchmarks (bench_ncsnv2.py) and write them as JSON.

    python bench/record.py --batches 1 16 --variants all --out-dir $OUT --tag b1-16 --deadline-s 540
    python bench/record.py --batches 64 --variants core --out-dir $OUT --tag b64 --deadline-s 540
    python bench/record.py --merge A.json B.json --out bench/results/<gpu>.json

A run writes <out-dir>/<gpu>[.<tag>].json (default out-dir bench/results) after every
measurement, so a run cut short keeps what it finished. <gpu> is the device name in lower
case with dashes, without "nvidia-" (e.g. h100-80gb-hbm3). With --deadline-s a measurement
whose estimated time (the last one at that batch size, times its calls) would end past the
deadline is skipped and listed with the reason. --merge combines runs of one device into one
file (later files win for the same variant and batch). The device session's one command is
bench/gpu_check.sh (docs/gpu.md); this script is for further runs and for merging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_ncsnv2 as bn  # noqa: E402  (sets TRITON_INTERPRET on CPU-only machines first)
import torch  # noqa: E402

import pursamere_fast  # noqa: E402
from pursamere_fast import graphs  # noqa: E402


def gpu_slug(device: torch.device) -> str:
    """File-name form of the device: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"; "cpu" on the CPU."""
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return slug.removeprefix("nvidia-")


def environment(device: torch.device) -> dict:
    """Device, versions and the numeric settings that change the figures."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                      pursamere_fast=pursamere_fast.__version__, git_commit=commit),
        settings=dict(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark,
                      matmul_precision=torch.get_float32_matmul_precision(),
                      default_capture_mode=graphs.CAPTURE_MODE, warmup_steps=graphs.WARMUP_STEPS),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    return env


def ceilings(device: torch.device, n: int = 8192, reps: int = 10) -> dict:
    """Measured ceilings beside the datasheet's: TFLOP/s of an n^3 matrix product in bf16, TF32
    and fp32 (random data; median of `reps` after 3 warm-ups, timed with CUDA events) and GB/s
    of a 1 GiB device-to-device copy (bytes read plus written)."""

    def median_ms(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    out = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                  ("fp32", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            out[f"matmul_{name}_tflops"] = 2 * n**3 / median_ms(lambda a=a, b=b: a @ b) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    out["copy_gbps"] = 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6
    return out


def select_variants(spec: str) -> list[str]:
    if spec == "all":
        return list(bn.VARIANTS)
    if spec == "core":
        return list(bn.CORE)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in bn.VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(bn.VARIANTS)} (or 'core', 'all')")
    return names


def new_document(device: torch.device, size: bn.Size, batches: tuple[int, ...]) -> dict:
    """A run's JSON before any measurement: environment, config, FLOP counts, empty results."""
    fwd, bwd = bn.flops_per_image_sample(size.ngf, size.image_size)
    cfg = size.config()
    return dict(
        environment(device),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(model="NCSNv2 CIFAR-10 architecture, random weights (seed 0)", ngf=size.ngf,
                    image_shape=list(size.image_shape), n_samples=cfg.n_samples, steps=cfg.num_steps,
                    num_sigmas=len(cfg.sigmas), steps_per_sigma=cfg.steps_per_sigma, sam_radius=cfg.sam_radius,
                    norm=cfg.norm, batches=list(batches), network_passes_timed=size.network_passes),
        flops=dict(forward_per_image_sample=fwd, input_backward_per_image_sample=bwd,
                   spec_gflop_forward=bn.SPEC_GFLOP_FWD, spec_gflop_input_backward=bn.SPEC_GFLOP_BWD),
        results=[], skipped=[],
    )


def add_result(doc: dict, row: dict) -> None:
    """Append a measured row, with its fraction of the measured matmul ceiling, and print it."""
    measured = doc.get("ceilings", {}).get(f"matmul_{row['precision']}_tflops")
    row["fraction_of_measured_matmul"] = row["tflops"] / measured if measured else None
    doc["results"].append(row)
    print(f"B={row['batch']:3d} {row['variant']:32s} {row['images_per_s']:10.2f} img/s  eff {row['efficiency']:.3f}  "
          f"{row['tflops']:.1f} TFLOP/s  mfu {row['mfu'] if row['mfu'] is None else round(row['mfu'], 3)}  "
          f"first {row['t_first_call_s']:.1f} s", flush=True)


def write_json(doc: dict, path: Path) -> None:
    """Write through a temporary file and a rename: a run killed mid-write keeps the last whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def record(args) -> Path:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = bn.SMALL if args.size == "tiny" else bn.FULL
    batches = tuple(args.batches or size.batches)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gpu_slug(device)}{'.' + args.tag if args.tag else ''}.json"
    doc = new_document(device, size, batches)
    if device.type == "cuda" and args.size == "full":
        doc["ceilings"] = ceilings(device)
    start, network_cache = time.perf_counter(), {}
    for batch in batches:
        last = None
        for name in select_variants(args.variants):
            variant = bn.VARIANTS[name]
            rounds = args.rounds or size.rounds.get(batch, 1)
            reason = variant.unavailable(device, args.size == "tiny")
            if reason is None and args.deadline_s and last is not None:
                # First call + timed calls + the network bound; a compile takes minutes of its own.
                estimate = last * (rounds + 2) + (180 if variant.compile_score else 0)
                if time.perf_counter() - start + estimate > args.deadline_s:
                    left = args.deadline_s - (time.perf_counter() - start)
                    reason = f"deadline: ~{estimate:.0f} s estimated, {left:.0f} s left"
            if reason:
                doc["skipped"].append(dict(variant=name, batch=batch, reason=reason))
            else:
                row = bn.measure(variant, batch, size, device, rounds=rounds, network_cache=network_cache)
                last = row["t_purify_s"]
                add_result(doc, row)
            write_json(doc, path)
    return path


def merge(paths: list[str], out: str) -> Path:
    """Combine runs of one device; later files win for the same (variant, batch)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    names = {d["device_name"] for d in docs}
    if len(names) != 1:
        raise SystemExit(f"cannot merge runs of different devices: {sorted(names)}")
    merged = dict(docs[0], results=[], skipped=[], merged_from=[Path(p).name for p in paths])
    rows, skipped = {}, {}
    for d in docs:
        for row in d["results"]:
            rows[(row["variant"], row["batch"])] = row
        for s in d["skipped"]:
            skipped[(s["variant"], s["batch"])] = s
    merged["results"] = sorted(rows.values(), key=lambda r: (r["batch"], list(bn.VARIANTS).index(r["variant"])))
    merged["skipped"] = [s for k, s in skipped.items() if k not in rows]
    merged["config"]["batches"] = sorted({r["batch"] for r in merged["results"]})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    return Path(out)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16 64)")
    parser.add_argument("--variants", default="core", help="'core', 'all' or comma-separated names")
    parser.add_argument("--rounds", type=int, help="timed purify calls per measurement (default 5/3/1 at B=1/16/64)")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--out-dir", default=str(BENCH / "results"))
    parser.add_argument("--tag", help="suffix of the output file, to keep partial runs apart")
    parser.add_argument("--deadline-s", type=float, help="skip measurements estimated to end after this many seconds")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge these runs into --out instead of measuring")
    parser.add_argument("--out", help="output of --merge")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        path = merge(args.merge, args.out)
    else:
        path = record(args)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
