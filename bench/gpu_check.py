"""The device session's measurements, against a deadline (bench/gpu_check.sh runs this).

    python bench/gpu_check.py --out-dir $OUT --deadline EPOCH_S [--install-note TEXT]
    python bench/gpu_check.py --tiny --out-dir DIR          # CPU, tiny sizes (tests/test_gpu_check.py)

In order, writing <out-dir>/<gpu>.json (record.gpu_slug) after every step, so that a run
killed at any point keeps every figure it finished ("current" names the step it was in):
1. the GPU tests (pytest on FULL_TESTS: the per-op kernel tests, whose CUDA cases run the
   compiled kernels at real sizes, tests/test_gpu.py, and the ahead-of-time compile check
   under the device's Triton; killed after --tests-timeout-s, default 240): counts and failure
   names (those finished before a timeout too), the log in <out-dir>/tests.log; a failure
   does not stop what follows;
2. determinism (`determinism`): NCSNv2 (random weights) forward + input gradient, and an
   eager purify, each run twice and compared bit for bit, with cuDNN deterministic and with
   the defaults, and the ops torch.use_deterministic_algorithms names as nondeterministic;
3. the exact-gradient path's peak memory (`exact_memory`): purify_unrolled forward + input
   gradient of NCSNv2 at B = 1 (N rows), one step, linf and l2 SAM, per score row, against
   the rows `exact.auto_chunk_rows` gives a CUDA chunk;
4. the measured matmul and copy ceilings (record.ceilings, CUDA only, a few seconds);
5. NCSNv2 CIFAR-10 (ngf 128, random weights, N = 8, K = 100, SAM on; bench_ncsnv2.measure)
   in the order of `plan`: the core variants at B = 16, the reference and triton+graphs at
   B = 1 with K = 20 (the ">= 5x the reference at B = 1" target), the core variants at B = 64;
   then, if time is left, channels_last (B = 16, 64), the whole loop as one graph (B = 1 with
   K = 20, B = 16) and compile (B = 16, 64).

Deadline: a measurement starts only if its predicted cost (the per-image-step time of the
same variant measured so far, else of the last measurement, times its calls) fits before the
deadline; otherwise it is listed under "skipped" with the reason, and the next one is tried.
Timed calls per measurement: one, then more (up to 5; 2 with --tiny) only out of the time the
remaining core measurements are not predicted to need.

--tiny runs the same plan on the CPU at bench_ncsnv2.SMALL (ngf 8, 8x8, N = 2, K = 2) with
B = 1 and 2 standing in for 16 and 64, and one CPU test of tests/test_gpu.py; CUDA-only
variants are skipped with the reason, and steps 2 and 3 run at that size (no peak memory on
a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import bench_ncsnv2 as bn  # noqa: E402  (sets TRITON_INTERPRET on CPU-only machines first)
import record  # noqa: E402
import torch  # noqa: E402
from pursamere_fast.kernels import use_triton  # noqa: E402

from pursamere_fast import exact, purify  # noqa: E402

CEILINGS_S = 30  # record.ceilings: 3 x 13 products of 8192^3 and 13 copies of 1 GiB, with slack
# Steps 2 and 3 (determinism, exact memory): a few NCSNv2 passes at B <= 2 each, with slack.
PROBES_S = 30
# Inductor's build of NCSNv2 forward + input-backward, once per compile measurement: purify's
# first call compiles for the B*N batch and the bare-network bound reuses that build (same
# shapes, strides and dtypes: bench_ncsnv2.network_inputs). A guess (never measured on a GPU).
COMPILE_S = 150
CORE = ("torch", "triton", "triton+graphs", "triton+graphs+bf16")
# Per-op kernel tests first (the kernels under everything else, never run compiled before),
# then the graphs, then the ahead-of-time compile check under the device's Triton (float64
# constants and spills; already run here under Triton 3.6, so last if time runs out).
FULL_TESTS = ("tests/test_ere_residual.py tests/test_mc_reduce_sam.py tests/test_adam_project.py "
              "tests/test_gpu.py tests/test_kernel_compile.py")
TINY_TESTS = "tests/test_gpu.py -k test_single_step_loop_uses_the_padded_noise_row"


@dataclasses.dataclass(frozen=True)
class Entry:
    variant: str
    batch: int
    size: bn.Size
    core: bool  # core entries are reserved time for; the others run only on what is left

    @property
    def steps(self) -> int:
        return self.size.config().num_steps


def plan(tiny: bool) -> list[Entry]:
    """The measurements in priority order."""
    if tiny:
        main = short = dataclasses.replace(bn.SMALL, batches=(1, 2))
    else:
        main = bn.FULL
        # The reference is the plain autograd loop: K = 20 (5 sigmas x 4) keeps it short, and
        # triton+graphs runs the same K beside it, so their ratio needs no rescaling.
        short = dataclasses.replace(bn.FULL, num_sigmas=5)
    small, large = (1, 2) if tiny else (16, 64)
    core = ([Entry(v, small, main, True) for v in CORE]
            + [Entry(v, 1, short, True) for v in ("reference", "triton+graphs")]
            + [Entry(v, large, main, True) for v in CORE])
    # If time is left, the options docs/gpu.md still has to decide on: channels_last, the
    # whole loop as one graph (graphs.CAPTURE_MODE), and compile (its build is the costliest).
    extra = ([Entry("triton+graphs+bf16+cl", b, main, False) for b in (small, large)]
             + [Entry("triton+graphs/loop", 1, short, False), Entry("triton+graphs/loop", small, main, False)]
             + [Entry("triton+graphs+bf16+cl+compile", b, main, False) for b in (small, large)])
    return core + extra


def predicted_t_purify(entry: Entry, rows: list[dict]) -> float | None:
    """Seconds of one purify call of `entry`, scaled per image-step from the same variant's
    last row, else from the last row; None before any row."""
    same = [r for r in rows if r["variant"] == entry.variant]
    base = (same or rows or [None])[-1]
    if base is None:
        return None
    return base["t_purify_s"] / (base["batch"] * base["steps"]) * entry.batch * entry.steps


def network_s(entry: Entry, t_purify: float) -> float:
    """Seconds of the bare-network bound: warm-up + reps of `network_passes` passes, of the 2K
    passes a purify call makes."""
    return t_purify * entry.size.network_passes * (entry.size.network_reps + 1) / (2 * entry.steps)


def predicted_cost_s(entry: Entry, t_purify: float) -> float:
    """Seconds a measurement takes with one timed call: the first call (a whole purify when it
    captures or compiles), the timed call, and the bare-network bound."""
    variant = bn.VARIANTS[entry.variant]
    first = t_purify if variant.cuda_graph or variant.compile_score else 0.0
    return first + t_purify + network_s(entry, t_purify) + (COMPILE_S if variant.compile_score else 0.0)


def determinism(device: torch.device, size: bn.Size, batch: int = 2) -> dict:
    """Whether two eager runs give the same bits: NCSNv2's forward and input gradient on a B*N
    batch, and an eager purify (K = 2), with cuDNN deterministic and with the defaults; and the
    ops `torch.use_deterministic_algorithms(True, warn_only=True)` warns about in that pass
    (on CUDA: the backward of bilinear interpolation and of max_pool2d accumulate with atomics)."""
    cfg = size.config().with_overrides(sigmas=size.config().sigmas[:1], steps_per_sigma=2, max_batch=batch)
    score, x = bn.make_score(size, device), bn.make_images(batch, size, device)
    y, sigma = bn.network_inputs(x, cfg)
    upstream = torch.randn_like(y)
    backend = "triton" if use_triton(device) else "torch"

    def network():
        yl = y.detach().requires_grad_(True)
        s = score(yl, sigma)
        (g,) = torch.autograd.grad(s, yl, upstream)
        return s.detach(), g

    def pair(fn):
        a, b = fn(), fn()
        return torch.equal(a, b), (a - b).abs().max().item()

    out = {}
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        for name, det in (("cudnn_deterministic", True), ("defaults", False)):
            torch.backends.cudnn.deterministic = det
            torch.backends.cudnn.benchmark = False if det else saved[1]
            fwd, fwd_diff = pair(lambda: network()[0])
            grad, grad_diff = pair(lambda: network()[1])
            pur, pur_diff = pair(lambda: purify(x, score, cfg, backend=backend, cuda_graph=False))
            out[name] = dict(forward_bitwise=fwd, forward_max_abs_diff=fwd_diff, input_grad_bitwise=grad,
                             input_grad_max_abs_diff=grad_diff, purify_bitwise=pur, purify_max_abs_diff=pur_diff)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            network()
        finally:
            torch.use_deterministic_algorithms(False)
    out["nondeterministic_ops"] = sorted({str(w.message).split(" does not have")[0][:120] for w in caught
                                          if "deterministic" in str(w.message)})
    out.update(batch=batch, n_samples=cfg.n_samples, steps=cfg.num_steps, backend=backend)
    return out


def exact_memory(device: torch.device, size: bn.Size, batch: int = 1) -> dict:
    """Peak memory of the exact-gradient path (`exact.purify_unrolled` forward + input gradient,
    one step) at B = `batch` (B*N score rows), per row, for linf and l2 SAM; on CUDA only (the
    CPU runs it at the tiny size to keep this code working, without a peak)."""
    cfg = size.config().with_overrides(sigmas=size.config().sigmas[:1], steps_per_sigma=1, max_batch=batch)
    rows = batch * cfg.n_samples
    out = dict(batch=batch, rows=rows, steps=1, chunk_rows_auto=exact.auto_chunk_rows(None, device, size.image_shape))
    for norm, rho in (("linf", 8 / 255), ("l2", 0.5)):
        score, x = bn.make_score(size, device), bn.make_images(batch, size, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        xr = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        pur = exact.purify_unrolled(xr, score, cfg.with_overrides(norm=norm, rho=rho))
        torch.autograd.grad(pur.sum(), xr)
        bn.sync(device)
        row = dict(wall_s=round(time.perf_counter() - t0, 3), peak_gib=None, per_row_gib=None)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            row.update(peak_gib=peak, per_row_gib=peak / rows, rows_in_80pct_of_memory=int(0.8 * total * rows / peak),
                       predicted_gib_at_chunk_rows_auto=peak / rows * out["chunk_rows_auto"])
        out[norm] = row
        del score, x, xr, pur
    return out


def parse_pytest(output: str) -> dict:
    """Counts and failures from `pytest -v -rfE` output, complete or cut off by a timeout."""
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", output, re.M)
    counts = {}
    for _, outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    summary = re.findall(r"^=+ (.* in [\d.]+s.*?) =+$", output, re.M)
    return dict(counts=counts,
                failures=[name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")],
                failure_lines=[line[:300] for line in re.findall(r"^(?:FAILED|ERROR) \S+.*$", output, re.M)],
                summary=summary[-1] if summary else None)


def run_tests(tests: str, timeout_s: float, log: Path) -> dict:
    """pytest on `tests` (a shlex string) in a subprocess, killed with its children at timeout_s."""
    cmd = [sys.executable, "-m", "pytest", *shlex.split(tests), "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # Its own session, so that a timeout also ends what it started (Inductor's compile workers).
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    output = log.read_text(errors="replace")
    return dict(command=shlex.join(cmd[1:]), timeout_s=round(timeout_s), wall_s=round(time.perf_counter() - t0, 1),
                returncode=returncode, timed_out=returncode is None, log=log.name, **parse_pytest(output),
                output_tail=output[-1500:] if returncode not in (0, 5) else None)


def targets(rows: list[dict], large: int) -> dict:
    """The issue's targets from the rows so far (missing figures are None); `large` stands for B = 64."""

    def row(variant, batch):
        return next((r for r in rows if r["variant"] == variant and r["batch"] == batch), None)

    ref, fast = row("reference", 1), row("triton+graphs", 1)
    bf16_large = [r for r in rows if r["precision"] == "bf16" and r["batch"] == large]
    return {
        "triton+graphs efficiency at B*N >= 128 (target >= 0.95)": {
            str(r["batch"]): r["efficiency"] for r in rows
            if r["variant"] == "triton+graphs" and r["batch"] * r["n_samples"] >= 128},
        "triton+graphs speed-up over reference at B = 1 (target >= 5)":
            ref["t_purify_s"] / fast["t_purify_s"] if ref and fast and ref["steps"] == fast["steps"] else None,
        f"best bf16 MFU at B = {large} (target >= 0.35 at B = 64, stretch 0.5)":
            max((r["mfu"] for r in bf16_large if r["mfu"] is not None), default=None),
    }


class Check:
    """One run: the document, the deadline, and what has been measured."""

    def __init__(self, args):
        self.tiny = args.tiny
        self.deadline = args.deadline
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.entries = plan(self.tiny)
        self.max_rounds = 2 if self.tiny else 5
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.path = out_dir / f"{record.gpu_slug(self.device)}.json"
        self.batches = sorted({e.batch for e in self.entries})
        main = self.entries[0].size
        short_steps = next(e.steps for e in self.entries if e.variant == "reference")
        self.doc = record.new_document(self.device, main, tuple(self.batches))
        self.doc.update(
            command="bash bench/gpu_check.sh" + (" --tiny" if self.tiny else ""),
            mode="tiny (bench_ncsnv2.SMALL)" if self.tiny else "full",
            install=args.install_note,
            notes=[f"reference and triton+graphs at B = 1 run K = {short_steps} (the others K = "
                   f"{main.config().num_steps}): the reference loop is slow; their ratio is a like-for-like speed-up",
                   "rounds: timed purify calls per measurement, as many as the deadline allowed (at most "
                   f"{self.max_rounds}); t_purify_s is their median, t_purify_each_s each call"],
            errors=[], current="starting")
        self.network_cache = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def write(self) -> None:
        self.doc["targets"] = targets(self.doc["results"], self.batches[-1])
        record.write_json(self.doc, self.path)

    def run(self, tests: str, tests_timeout_s: float) -> Path:
        self.write()
        self.step_tests(tests, tests_timeout_s)
        self.step_probe("determinism", determinism)
        self.step_probe("exact_memory", exact_memory)
        self.step_ceilings()
        for i, entry in enumerate(self.entries):
            self.step_measure(entry, self.entries[i + 1:])
        self.doc["current"] = "done"
        self.write()
        return self.path

    def step_tests(self, tests: str, timeout_s: float) -> None:
        if self.left() <= 0:
            self.doc["gpu_tests"] = dict(skipped="deadline")
        else:
            self.doc["current"] = "gpu_tests"
            self.write()
            self.doc["gpu_tests"] = run_tests(tests, min(timeout_s, self.left()), self.out_dir / "tests.log")
        result = self.doc["gpu_tests"]
        print("gpu tests: " + (f"skipped: {result['skipped']}" if "skipped" in result else
                               f"{result['summary'] or result['counts']}, timed out: {result['timed_out']}, "
                               f"failures: {result['failures']}"), flush=True)
        self.write()

    def step_probe(self, key: str, probe) -> None:
        """A short measurement `probe(device, size)` -> dict stored under `key`; its failure is
        recorded there and does not stop the run."""
        if self.left() < (5 if self.tiny else PROBES_S):
            self.doc[key] = dict(skipped="deadline")
        else:
            self.doc["current"] = key
            self.write()
            try:
                self.doc[key] = probe(self.device, self.entries[0].size)
            except Exception as exc:
                self.doc[key] = dict(error=repr(exc)[:500], traceback=traceback.format_exc()[-2000:])
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{key}: {self.doc[key]}", flush=True)
        self.write()

    def step_ceilings(self) -> None:
        if self.device.type != "cuda" or self.tiny:
            self.doc["ceilings"] = dict(skipped="measured at full size on CUDA only")
        elif self.left() < CEILINGS_S:
            self.doc["ceilings"] = dict(skipped="deadline")
        else:
            self.doc["current"] = "ceilings"
            self.write()
            try:
                self.doc["ceilings"] = record.ceilings(self.device)
            except Exception as exc:  # the benchmark has its datasheet peaks without them
                self.doc["ceilings"] = dict(error=repr(exc)[:500])
        self.write()

    def step_measure(self, entry: Entry, later: list[Entry]) -> None:
        variant = bn.VARIANTS[entry.variant]
        reason = variant.unavailable(self.device, self.tiny)
        t_pred = predicted_t_purify(entry, self.doc["results"])
        cost = None if t_pred is None else predicted_cost_s(entry, t_pred)
        left = self.left()
        if reason is None and (left <= 0 or (cost is not None and cost > left)):
            reason = f"deadline: {max(left, 0):.0f} s left" + (f", ~{cost:.0f} s predicted" if cost else "")
        if reason:
            self.doc["skipped"].append(dict(variant=entry.variant, batch=entry.batch, steps=entry.steps,
                                            reason=reason))
            print(f"B={entry.batch:3d} {entry.variant:32s} skipped: {reason}", flush=True)
            self.write()
            return
        print(f"B={entry.batch:3d} {entry.variant:32s} starting: {left:.0f} s left"
              + (f", ~{cost:.0f} s predicted" if cost else ""), flush=True)
        self.doc["current"] = dict(variant=entry.variant, batch=entry.batch, steps=entry.steps,
                                   started=time.strftime("%H:%M:%S"), predicted_s=cost)
        self.write()
        times = []

        def timer(run, _rounds):  # measure's fixed rounds are replaced by what the deadline allows
            times.append(bn.median_time(run, 1, self.device))
            for _ in range(self.extra_rounds(entry, times[0], later)):
                times.append(bn.median_time(run, 1, self.device))
            return statistics.median(times)

        try:
            row = bn.measure(variant, entry.batch, entry.size, self.device, timer=timer,
                             network_cache=self.network_cache)
        except Exception as exc:  # a failed variant (capture, OOM, compile) must not stop the others
            self.doc["errors"].append(dict(variant=entry.variant, batch=entry.batch, error=repr(exc)[:500],
                                           traceback=traceback.format_exc()[-2000:]))
            print(f"B={entry.batch:3d} {entry.variant:32s} failed: {exc!r}", flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            row.update(rounds=len(times), t_purify_each_s=times)
            record.add_result(self.doc, row)
        self.doc["current"] = None
        self.write()

    def extra_rounds(self, entry: Entry, t_purify: float, later: list[Entry]) -> int:
        """Timed calls after the first: the slack left once the later core entries' predicted
        costs (from the rows so far and this call) are reserved, shared with them."""
        provisional = self.doc["results"] + [dict(variant=entry.variant, batch=entry.batch, steps=entry.steps,
                                                  t_purify_s=t_purify)]
        core = [e for e in later if e.core and bn.VARIANTS[e.variant].unavailable(self.device, self.tiny) is None]
        reserve = sum(predicted_cost_s(e, predicted_t_purify(e, provisional)) for e in core)
        slack = self.left() - reserve - network_s(entry, t_purify)
        return max(0, min(self.max_rounds - 1, int(slack / (len(core) + 1) / t_purify)))


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: the check of this script itself")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--deadline", type=float, default=time.time() + 540,
                        help="Unix time by which everything must have ended (default: 540 s from now)")
    parser.add_argument("--tests", help=f"pytest arguments of the GPU tests (default '{FULL_TESTS}'; "
                                        f"--tiny: '{TINY_TESTS}')")
    parser.add_argument("--tests-timeout-s", type=float, default=240)
    parser.add_argument("--install-note", help="how gpu_check.sh installed the package, for the JSON")
    args = parser.parse_args(argv)
    path = Check(args).run(args.tests or (TINY_TESTS if args.tiny else FULL_TESTS), args.tests_timeout_s)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
