"""`pursamere-fast protocol {run,config,select,report}`: the stage driver of the evaluation protocol
(the library: `pursamere_fast.protocol`; docs/protocol.md).

`run` calls `train-score`, `score-quality`, `train-classifier`, `evaluate` and the steps of the
library in one process (a torch import per stage would cost more than a smoke run's work) and
logs each stage with its equivalent command line, so that any stage can be rerun alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import checks
from ..attacks.loading import load_object, load_toml
from ..attacks.suite import summarise_dir
from ..protocol.report import write_report
from ..protocol.selection import augmentation_config, choice_markdown, select
from ..protocol.spec import (
    AUGMENT,
    CHOICE,
    CHOICE_MD,
    CLASSIFIERS,
    check_held_out,
    data_root,
    dump_toml,
    quality_options,
    resolve,
    score_training_options,
    selection_rule,
    spec,
    training_options,
)
from .evaluate import main_evaluate
from .options import ArgumentParser, existing_dir, existing_file, integer, option_errors
from .options import device as device_type
from .quality import main as main_score_quality
from .train_classifier import main_train_classifier
from .train_score import main_train_score


def _argv(table: Mapping) -> list[str]:
    """Command-line options from a table: key -> --key value (a true flag alone, a false one dropped)."""
    out = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def stage(out: Path, name: str, command: str, func, argv: Sequence[str]) -> None:
    """Run one stage in this process, its output appended to out/logs/<name>.log (each run starts
    with its UTC time and the equivalent command, to rerun it alone): appended, because a stage
    resumed over sessions (or stopped to be rerun at a larger n) keeps the log of its earlier
    passes. A failure prints the log's end and exits. A stage's --threads (score-quality sets 1)
    does not carry over to the next."""
    log = out / "logs" / f"{name}.log"
    print(f"{_now()} {name} ...", flush=True)
    t0, threads = time.monotonic(), torch.get_num_threads()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        if f.tell():
            print()
        print(f"# {_now()}\n$ {command} {shlex.join(argv)}", flush=True)
        try:
            code = func(list(argv))
        except SystemExit as e:  # argparse's one-line errors end a command so
            code = e.code
        except Exception:  # noqa: BLE001 - the traceback goes to the stage's log, the driver stops below
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    if code not in (0, None):
        sys.stderr.write("\n".join(log.read_text().splitlines()[-5:]) + f"\nstage {name} failed (log: {log})\n")
        raise SystemExit(1)
    print(f"{_now()} {name} done in {time.monotonic() - t0:.0f} s", flush=True)


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensors (names and bytes), not of its header: the trainers
    rewrite the header (timings) each time they run, also when a finished run only resumes."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(os.fspath(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest(path: str | os.PathLike) -> str:
    return weights_sha256(path) if os.fspath(path).endswith(".safetensors") else _sha256(path)


def pin_inputs(run: Path, inputs: Mapping[str, str]) -> None:
    """Record what a run's results depend on (run/inputs.json: weights' sha256, settings) and
    refuse to continue it with others: evaluate's manifest knows the settings, not the weights.

    Raises:
        ValueError: run holds results made with other inputs (one line, naming inputs.json).
    """
    path = run / "inputs.json"
    if path.is_file() and json.loads(path.read_text()) != dict(inputs):
        raise ValueError(f"{run} holds results made with other weights or settings than "
                         f"{', '.join(f'{k} {str(v)[:12]}' for k, v in inputs.items())} ({path}); remove {run} to "
                         f"redo it")
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(inputs), indent=1))


def _run_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast protocol run",
                       description="An evaluation protocol (docs/protocol.md): train the score model (if the "
                                   "protocol does), the clean classifier, choose the PurSAMERE (and ADP) "
                                   "configurations on held-out images, train the augmented classifier, evaluate "
                                   "both on the test set, write OUT_DIR/report.md. Rerunning continues.")
    p.add_argument("out", metavar="OUT_DIR", nargs="?", default=None,
                   help="results (default: the protocol's [protocol] out, with _smoke appended under --smoke)")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml")
    p.add_argument("--score", type=existing_file, default=None,
                   help="the score file (required unless the protocol trains one: then a finished train-score "
                        "file whose metadata shows the same held-out images, instead of the train_score stage)")
    p.add_argument("--data-root", type=existing_dir, default=None,
                   help="the data directory (Fashion-MNIST: default $PURSAMERE_FASHION_MNIST, then Debian's)")
    p.add_argument("--smoke", action="store_true", help="the smoke profile ([smoke] of the protocol)")
    p.add_argument("--device", type=lambda t: t if t == "auto" else device_type(t), default="auto",
                   help="cpu, cuda, cuda:<index> or auto (cuda when available)")
    p.add_argument("--test-n", type=integer(1), default=None,
                   help="this pass evaluates at most the first TEST_N images of every test job (each job of "
                        "both classifiers, then the report, at that n); rerun with a larger one or without it to "
                        "extend the same runs (a row depends only on its image)")
    args = p.parse_args(argv)
    configs = Path(args.protocol).parent
    with option_errors(p, "--protocol"):
        protocol = load_toml(args.protocol)
        names = spec(protocol)
        train = training_options(protocol, args.smoke)
        train_score = score_training_options(protocol, args.smoke)
        quality = quality_options(protocol, args.protocol, args.smoke)
        selection_rule(protocol, args.smoke)  # checked now; the choose stage applies it
        templates = {name: load_toml(configs / name) for name in [names.select, *names.tests.values()]}
    p.prog = names.driver
    holdout = train["holdout"]
    if args.score is None and train_score is None:
        p.error(f"argument {names.score_arg}: required (the protocol trains no score model)")
    # The inputs are checked before hours of training: the score loads, the test images read.
    if args.score is not None:
        with option_errors(p, names.score_arg):
            load_object(names.score, {"path": args.score})
            if train_score is not None:
                check_held_out(args.score, names.dataset, holdout)
    with option_errors(p, names.data_arg):
        root = data_root(names, args.data_root)
        load_object(names.data, {"root": root, "part": "test"})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out or (names.out + ("_smoke" if args.smoke else "")))
    for sub in ("logs", "models", "configs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    data = ["--dataset", names.dataset, "--data-root", root]

    def pin(run: Path, inputs: Mapping[str, str]) -> None:
        with option_errors(p, "OUT_DIR"):
            pin_inputs(run, inputs)

    score = args.score
    if score is None:
        score = str(out / "models" / "score.safetensors")
        stage(out, "train_score", "pursamere-fast train-score", main_train_score,
               [*data, *_argv(train_score), "--holdout", str(holdout), "--no-progress",
                "--out", str(out / "train_score"), "--export", score])
    score_digest = {"score": _digest(score)}
    if quality is not None:
        run = out / "score_quality"
        extra = _argv({k: v for k, v in quality.items() if k != "baseline"})
        pin(run, {"baseline": _digest(quality["baseline"]), **score_digest, "options": shlex.join(extra)})
        if not (run / "quality.md").is_file():
            stage(out, "score_quality", "pursamere-fast score-quality", main_score_quality,
                   ["--score", quality["baseline"], "--score", score, "--split", "validation",
                    "--data-root", root, *extra, "--out", str(run)])
    paths = {"score": score, "data_root": root, "holdout": holdout, "smoke": args.smoke}

    def write_config(name: str, choice: Mapping | None = None, cap: int | None = None) -> str:
        path = out / "configs" / name
        with option_errors(p, "--protocol"):
            cfg = resolve(templates[name], protocol, choice=choice, where=name, **paths)
            if cap is not None and isinstance(cfg.get("n"), int):
                cfg["n"] = min(cfg["n"], cap)
            if cfg.get("data_kwargs", {}).get("part") == "validation":
                checks.integer(f"n of {name} (at most [train] holdout)", cfg.get("n"), 1, holdout)
        path.write_text(dump_toml(cfg))
        return str(path)

    arch = train.get("arch", "smallcnn")

    def train_classifier(name: str, *extra: str) -> None:
        stage(out, f"train_{name}", "pursamere-fast train-classifier", main_train_classifier,
               [*data, *_argv(train), "--device", device, "--no-progress", "--out", str(out / f"train_{name}"),
                "--export", str(out / "models" / f"{arch}_{name}.safetensors"), *extra])

    def evaluate(name: str, config: str, run: Path, classifier: str) -> None:
        weights = out / "models" / f"{arch}_{classifier}.safetensors"
        pin(run, {**score_digest, "classifier": weights_sha256(weights)})
        stage(out, name, "pursamere-fast evaluate", main_evaluate,
               ["--config", config, "--out", str(run), "--device", device, "--classifier", str(weights)])

    select_config = write_config(names.select)
    train_classifier("clean")
    evaluate("select", select_config, out / "select", "clean")
    stage(out, "choose", "pursamere-fast protocol select", _select_cmd,
           ["--protocol", args.protocol, *(["--smoke"] if args.smoke else []), "--config", select_config,
            "--out", str(out / "select")])
    sys.stdout.write((out / "select" / CHOICE_MD).read_text())
    choice = json.loads((out / "select" / CHOICE).read_text())
    augment = json.loads((out / "select" / AUGMENT).read_text())
    pin(out / "train_aug", score_digest)  # its hyperparameters pin the rest
    train_classifier("aug", "--purify-score", score, "--purify-config", json.dumps(augment))
    tests = {job: write_config(name, choice, args.test_n) for job, name in names.tests.items()}
    # Job by job, both classifiers each: a pass that stops early leaves complete comparisons.
    for job, config in tests.items():
        for classifier in CLASSIFIERS:
            evaluate(f"test_{classifier}_{job}", config, out / "test" / classifier / job, classifier)
    write_report(out, names.title)
    print(f"{_now()} done: {out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------------- command line

def _config_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast protocol config",
                       description="Resolve protocol templates into evaluate configs.")
    p.add_argument("templates", nargs="+", type=existing_file, help="template TOML files (configs/<name>_*.toml)")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml")
    p.add_argument("--score", type=existing_file, required=True, help="the score file")
    p.add_argument("--data-root", type=existing_dir, default=None,
                   help="the data directory (Fashion-MNIST: default $PURSAMERE_FASHION_MNIST, then Debian's)")
    p.add_argument("--choice", type=existing_file, default=None, help="the selection's choice.json")
    p.add_argument("--smoke", action="store_true", help="apply the protocol's [smoke] table")
    p.add_argument("--out-dir", required=True, help="where the configs go (same file names)")
    args = p.parse_args(argv)
    with option_errors(p, "--protocol"):
        protocol = load_toml(args.protocol)
        names = spec(protocol)
        holdout = training_options(protocol, args.smoke)["holdout"]
    with option_errors(p, "--data-root"):
        root = data_root(names, args.data_root)
    choice = None
    if args.choice:
        with option_errors(p, "--choice"):
            choice = json.loads(Path(args.choice).read_text())
    with option_errors(p, "--out-dir"):
        os.makedirs(args.out_dir, exist_ok=True)
    for template in args.templates:
        with option_errors(p, "templates"):
            cfg = resolve(load_toml(template), protocol, score=args.score, data_root=root, holdout=holdout,
                          choice=choice, smoke=args.smoke, where=template)
            Path(args.out_dir, os.path.basename(template)).write_text(dump_toml(cfg))
    return 0


def _select_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast protocol select",
                       description="Apply the protocol's selection rule to the finished validation suite; write "
                                   "choice.json, choice.md and augment.json (the augmented classifier's purification).")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml")
    p.add_argument("--config", type=existing_file, required=True, help="the resolved selection config")
    p.add_argument("--out", type=existing_dir, required=True, help="the selection run's directory")
    p.add_argument("--smoke", action="store_true", help="the smoke profile's rule ([smoke.selection])")
    args = p.parse_args(argv)
    with option_errors(p, "--protocol"):
        rule = selection_rule(load_toml(args.protocol), args.smoke)
    with option_errors(p, "--config"):
        config = load_toml(args.config)
    with option_errors(p, "--out"):
        choice = select(summarise_dir(args.out), config, rule)
    Path(args.out, CHOICE).write_text(json.dumps(choice, indent=1))
    Path(args.out, CHOICE_MD).write_text(choice_markdown(choice))
    sys.stdout.write(choice_markdown(choice))
    missing = [group for group, chosen in choice["chosen"].items() if chosen is None]
    if missing:
        p.error(f"argument --out: no eligible config for {', '.join(missing)} (see {CHOICE_MD})")
    Path(args.out, AUGMENT).write_text(json.dumps(augmentation_config(config, choice)))
    return 0


def _report_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast protocol report",
                       description="Write OUT/report.md (and its figure, report.png): score model, classifiers, "
                                   "selection, every evaluation summary and the verdicts.")
    p.add_argument("out", type=existing_dir, help="the protocol's output directory")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml (its title)")
    args = p.parse_args(argv)
    with option_errors(p, "--protocol"):
        title = spec(load_toml(args.protocol)).title
    sys.stdout.write(write_report(args.out, title))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `run` (scripts/run_<name>.sh), `config`, `select` or `report` (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": _run_cmd, "config": _config_cmd, "select": _select_cmd, "report": _report_cmd}
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: pursamere-fast protocol {run,config,select,report} [options]\n")
        return 0
    if not argv or argv[0] not in commands:
        sys.stderr.write("usage: pursamere-fast protocol {run,config,select,report} [options]\n")
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
