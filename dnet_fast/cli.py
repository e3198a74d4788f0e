"""The ``dnet-fast`` command line: train | eval | info | report | plot | compare | convert | bench (parse → one call)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["get_parser", "main", "split_train_tokens"]

# Convenience flags of `train`, each a shorthand for one dotted override.
_TRAIN_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--dataset", "data.dataset", str, "dataset registry name (default: the embedded synthetic set)"),
    ("--data", "data.root", str, "converted shard directory (implies --dataset shards unless given)"),
    ("--root", "data.root", str, "dataset root (CIFAR python folder or image root)"),
    ("--loader", "data.loader", str, "train loader: auto | resident | naive | ffcv | dali"),
    ("--workers", "data.workers", int, "loader workers/threads (-1: what the training threads leave)"),
    ("--imbalance", "data.imbalance", float, "imbalance ratio ρ of generated/CIFAR-LT profiles"),
    ("--backbone", "model.backbone", str, "model registry name (resnet32, resnet50, resnet152, ...)"),
    ("--head", "model.head", str, "classifier head: linear | cosine"),
    ("--pretrained", "model.pretrained", str, "torchvision-layout .pth to load into the backbone"),
    ("--loss", "loss.name", str, "per-sample loss registry name"),
    ("--meta", "meta.mode", str,
     "meta mode: exact | driver | off | mwn | frozen | exact_absolute | exact_sample"),
    ("--lambda", "meta.lambda_dr", float, "driver-loss weight λ"),
    ("--epochs", "optim.epochs", int, "training epochs"),
    ("--batch-size", "optim.batch_size", int, "training batch size"),
    ("--lr", "optim.lr", float, "peak learning rate"),
    ("--seed", "run.seed", int, "seed of every random draw"),
    ("--max-iters", "run.max_iters", int, "stop after N iterations in total, then evaluate (smoke runs)"),
    ("--out", "run.out_dir", str, "run directory"),
    ("--device", "run.device", str, "auto | cpu | cuda"),
    ("--precision", "run.precision", str, "fp32 | bf16"),
    ("--method", "stage2.method", str, "stage-2 method with --from: crt | lws | tau_norm | las"),
)

# `section.key=value`: the shape of a dotted override (a preset name or YAML path never has it).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.\w+=")

_EPILOG_TRAIN = (
    "Positional tokens may stand anywhere among the flags: at most one PRESET (a name from "
    "`dnet-fast info --presets` or a YAML path) and any number of section.key=value overrides."
)


def get_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dnet-fast`` (reusable by tests and docs).

    ``train`` is parsed with ``parse_known_args``: its positional tokens (preset, overrides) are sorted by
    :func:`split_train_tokens`, so that they may come before, between or after the flags.
    """
    parser = argparse.ArgumentParser(prog="dnet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: Difficulty-Net on the embedded dataset)",
                           epilog=_EPILOG_TRAIN)
    train.add_argument("preset", nargs="?", default=None,
                       help="preset name (dnet-fast info --presets) or YAML path; omitted: defaults")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=0.05")
    for flag, _, kind, text in _TRAIN_FLAGS:
        train.add_argument(flag, type=kind, default=None, help=f"{text}")
    train.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR",
                       help="stage 2: re-balance the classifier of this finished stage-1 run (a *_stage2 preset)")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    train.add_argument("--no-graph", action="store_true", help="run the step eagerly (no CUDA graph)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML and exit (nothing is trained or written)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its test (or val) set")
    ev.add_argument("checkpoint")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--data", default=None, metavar="DIR",
                    help="dataset root to use instead of the checkpoint's data.root (moved or copied data)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    info = sub.add_parser("info", help="versions, CUDA, extension build status, presets")
    info.add_argument("--presets", action="store_true", help="list the shipped presets")
    info.add_argument("--json", action="store_true")

    report = sub.add_parser(
        "report", help="table of finished runs (mean ± std over seeds, final weight spread)",
        epilog="For paired differences by seed with 95 %% confidence intervals: dnet-fast compare A... --vs B...",
    )
    report.add_argument("runs", nargs="+", help="run directories holding results.json")

    plot = sub.add_parser("plot", help="PNG figures: paper Figs. 2-4, per-class accuracy, training curves")
    plot.add_argument("runs", nargs="+", help="run directories (history.jsonl, results.json, metrics.jsonl)")
    plot.add_argument("--out", default=None,
                      help="folder for the PNGs (default: the run directory, or the runs' common parent)")

    compare = sub.add_parser(
        "compare", help="paired B - A differences by seed with 95 %% Student-t confidence intervals",
        usage="%(prog)s A_RUN [A_RUN ...] --vs B_RUN [B_RUN ...] [--json]",
    )
    compare.add_argument("a_runs", nargs="+", metavar="A_RUN", help="finished runs of method A")
    compare.add_argument("--vs", dest="b_runs", nargs="+", required=True, metavar="B_RUN",
                         help="finished runs of method B (paired with A by config.run.seed)")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")


    sub.add_parser("convert", add_help=False,
                   help="convert a dataset to shards: places-lt | imagenet-lt | cifar-lt | list (see convert -h)")
    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suite from a source checkout (runner's own flags; bench -h)")
    return parser


def split_train_tokens(tokens: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Sorts train's positional tokens into (preset, overrides in order, unrecognised tokens).

    A token shaped ``section.key=value`` is an override; the first other token is the preset; flags argparse did
    not know and any further non-override token are unrecognised.
    """
    preset, overrides, unknown = None, [], []
    for token in tokens:
        if _OVERRIDE.match(token):
            overrides.append(token)
        elif token.startswith("-") or preset is not None:
            unknown.append(token)
        else:
            preset = token
    return preset, overrides, unknown


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides first, then the convenience flags (the more specific spelling wins)."""
    overrides = list(args.overrides)
    if args.data is not None and args.dataset is None:
        overrides.append("data.dataset=shards")
    for flag, key, _, _ in _TRAIN_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_graph:
        overrides.append("run.graph=off")
    if args.no_progress or not sys.stderr.isatty():
        overrides.append("run.progress=false")
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    if args.from_run is not None:
        return _train_stage2(args)
    from dnet_fast import distributed
    from dnet_fast.config import dump_yaml, load_config, resolve_paths
    from dnet_fast.plugins import check_names

    cfg = load_config(args.preset, _train_overrides(args))
    if cfg.stage2.method != "none":
        msg = f"{args.preset or 'the config'} is a stage-2 config (stage2.method={cfg.stage2.method}): add --from RUN_DIR"
        raise ValueError(msg)
    if args.print_config:  # what fit would run: names checked, paths absolute (fit does both itself)
        print(dump_yaml(resolve_paths(check_names(cfg))), end="")
        return 0
    from dnet_fast.engine import fit
    from dnet_fast.report import format_results

    with distributed.reported("dnet-fast train"):  # under torchrun: errors name the rank; no-op otherwise
        results = fit(cfg, resume=args.resume)
    if distributed.env_rank() == 0:
        print(format_results(results, cfg.run.out_dir))
    return 0


def _train_stage2(args: argparse.Namespace) -> int:
    from dnet_fast.config import dump_yaml
    from dnet_fast.report import format_results
    from dnet_fast.stage2.train import fit_stage2, load_stage2_config

    if args.resume:
        msg = "--resume is for stage-1 runs; a stage-2 run restarts from --from"
        raise ValueError(msg)
    cfg = load_stage2_config(args.preset, args.from_run, _train_overrides(args))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    results = fit_stage2(cfg)
    print(format_results(results, cfg.run.out_dir))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dnet_fast.evaluation import evaluate_checkpoint
    from dnet_fast.report import format_eval

    result = evaluate_checkpoint(args.checkpoint, split=args.split, device=args.device, data_root=args.data)
    print(json.dumps(result, indent=2) if args.json else format_eval(result))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from dnet_fast.config import preset_names
    from dnet_fast.info import environment, format_environment

    env = environment()
    if args.json:
        print(json.dumps({**env, "presets": preset_names()}, indent=2))
        return 0
    print(format_environment(env))
    if args.presets:
        print("presets     " + ", ".join(preset_names()))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dnet_fast.report import format_report

    print(format_report(args.runs))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from dnet_fast.plots import plot_runs

    done = plot_runs(args.runs, args.out)
    for line in done.skipped:
        print(f"dnet-fast plot: note: {line}", file=sys.stderr)
    for path in done.written:
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from dnet_fast.compare import compare_runs, format_comparison

    comparison = compare_runs(args.a_runs, args.b_runs)
    print(json.dumps(comparison.as_dict(), indent=2) if args.json else format_comparison(comparison))
    return 0


def _cmd_convert(argv: list[str]) -> int:
    from dnet_fast.convert.cli import main as convert_main

    return convert_main(argv, prog="dnet-fast convert")


def _source_checkout() -> Path | None:
    """The source checkout holding ``benchmarks/``: already importable, or the current folder or a parent."""
    found = importlib.util.find_spec("benchmarks")
    if found is not None and found.origin:
        return Path(found.origin).resolve().parents[1]
    here = Path.cwd().resolve()
    return next((d for d in (here, *here.parents) if (d / "benchmarks" / "runner.py").is_file()), None)


def _cmd_bench(argv: list[str]) -> int:
    checkout = _source_checkout()
    if checkout is None:
        print("dnet-fast bench: error: the benchmarks are not part of the package: run this inside a clone of "
              "the dnet-fast repository (it holds benchmarks/)", file=sys.stderr)
        return 2
    if str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # behind site-packages: an installed dnet_fast keeps precedence
    from benchmarks.runner import main as bench_main

    return bench_main(argv)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train, "eval": _cmd_eval, "info": _cmd_info, "report": _cmd_report,
    "plot": _cmd_plot, "compare": _cmd_compare,
}
# Everything after these belongs to their own parsers (the converters' and the benchmark runner's flags).
_PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {"convert": _cmd_convert, "bench": _cmd_bench}


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parses ``argv``; train's positional tokens may stand anywhere among its flags."""
    parser = get_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command == "train":
        tokens = ([args.preset] if args.preset else []) + list(args.overrides) + extras
        args.preset, args.overrides, extras = split_train_tokens(tokens)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _run(argv: list[str]) -> int:
    if argv[:1] and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    args = _parse(argv)
    _configure_logging()
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:
        raise
    except (ValueError, OSError, ImportError) as err:
        # Bad values, unknown names, unreadable files, a missing optional dependency (a loader's package,
        # matplotlib for plot): one clear line, non-zero exit, nothing written.
        print(f"dnet-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from dnet_fast.engine import TrainingDiverged  # already loaded: only training raises it

        if not isinstance(err, TrainingDiverged):
            raise
        print(f"dnet-fast {args.command}: error: {err}", file=sys.stderr)
        return 3


def _configure_logging() -> None:
    """The package's log records (a jvp fallback, an ignored compile request) go to stderr, INFO and above."""
    logger = logging.getLogger("dnet_fast")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dnet-fast: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _silence_stdout() -> None:
    """Points stdout at /dev/null so that the interpreter's final flush cannot fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stdout (tests) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dnet-fast`` console script; returns the exit status.

    A reader that closes the pipe early (``dnet-fast eval --json | head``) ends the command quietly with
    status 0: what it printed up to then was complete, the rest was not wanted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        _silence_stdout()
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
