"""The ``dnet-fast`` command line: train | eval | info | report | plot | compare | bench (parse → one library call)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["get_parser", "main"]

# Convenience flags of `train`, each a shorthand for one dotted override.
_TRAIN_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--dataset", "data.dataset", str, "dataset registry name (default: the embedded synthetic set)"),
    ("--data", "data.root", str, "converted shard directory (implies --dataset shards unless given)"),
    ("--root", "data.root", str, "dataset root (CIFAR python folder or image root)"),
    ("--loader", "data.loader", str, "train loader: auto | resident | naive | ffcv | dali"),
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
    ("--out", "run.out_dir", str, "run directory"),
    ("--device", "run.device", str, "auto | cpu | cuda"),
    ("--precision", "run.precision", str, "fp32 | bf16"),
    ("--method", "stage2.method", str, "stage-2 method with --from: crt | lws | tau_norm | las"),
)


def get_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dnet-fast`` (reusable by tests and docs)."""
    parser = argparse.ArgumentParser(prog="dnet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: Difficulty-Net on the embedded dataset)")
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

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its test (or val) set")
    ev.add_argument("checkpoint")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--device", default="auto")
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

    bench = sub.add_parser("bench", help="run the benchmark suite from a source checkout (runner's own flags)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to python -m benchmarks")
    return parser


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


def _split_preset(args: argparse.Namespace) -> None:
    """``train optim.lr=1`` puts the first override in ``preset``; move it back."""
    if args.preset is not None and "=" in args.preset:
        args.overrides.insert(0, args.preset)
        args.preset = None


def _cmd_train(args: argparse.Namespace) -> int:
    from dnet_fast import distributed
    from dnet_fast.config import load_config
    from dnet_fast.engine import fit
    from dnet_fast.report import format_results

    _split_preset(args)
    if args.from_run is not None:
        return _train_stage2(args)
    cfg = load_config(args.preset, _train_overrides(args))
    if cfg.stage2.method != "none":
        msg = f"{args.preset or 'the config'} is a stage-2 config (stage2.method={cfg.stage2.method}): add --from RUN_DIR"
        raise ValueError(msg)
    with distributed.reported("dnet-fast train"):  # under torchrun: errors name the rank; no-op otherwise
        results = fit(cfg, resume=args.resume)
    if distributed.env_rank() == 0:
        print(format_results(results, cfg.run.out_dir))
    return 0


def _train_stage2(args: argparse.Namespace) -> int:
    from dnet_fast.report import format_results
    from dnet_fast.stage2.train import fit_stage2, load_stage2_config

    if args.resume:
        msg = "--resume is for stage-1 runs; a stage-2 run restarts from --from"
        raise ValueError(msg)
    cfg = load_stage2_config(args.preset, args.from_run, _train_overrides(args))
    results = fit_stage2(cfg)
    print(format_results(results, cfg.run.out_dir))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dnet_fast.evaluation import evaluate_checkpoint
    from dnet_fast.report import format_eval

    result = evaluate_checkpoint(args.checkpoint, split=args.split, device=args.device)
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


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.runner import main as bench_main
    except ImportError:
        print("dnet-fast bench: the benchmarks/ folder of a source checkout must be importable "
              "(run from the repository root)", file=sys.stderr)
        return 2
    return bench_main(args.args)


_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "info": _cmd_info, "report": _cmd_report,
             "plot": _cmd_plot, "compare": _cmd_compare, "bench": _cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dnet-fast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to the benchmark runner's own parser (--cpu, --only, ...).
        return _cmd_bench(argparse.Namespace(args=argv[1:]))
    parser = get_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        # Overrides after the flags (`train demo_stage2 --from RUN --method las stage2.epochs=5`): argparse stops
        # collecting a positional list at the first option.
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging()
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as err:
        # Bad values, unknown names, unreadable files, a missing optional dependency (matplotlib for plot):
        # one clear line, non-zero exit, nothing written.
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


if __name__ == "__main__":
    sys.exit(main())
