"""The `pneumoscan` command: `pneumoscan {train,evaluate,predict,threshold,ood,export,explain,serve,demo}`.

`main(argv) -> int` runs in-process (the tests call it); `run()` is the console script.
Usage errors exit 2, failures exit 1, each with one sentence on stderr and no traceback
unless `--debug` is given. TensorFlow is imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from pneumoscan import forward
from pneumoscan.config import (
    ARCH_ALIASES,
    DEFAULTS,
    PRECISIONS,
    RECIPES,
    STRATEGIES,
    VAL_DESIGNS,
    Config,
    ThresholdRule,
    read_file_list,
)
from pneumoscan.errors import FAILURE, MissingExtra, PneumoscanError, UsageError
from pneumoscan.forward import INFERENCE_BATCH

# TensorFlow's C++ log: 0 shows its start-up chatter (absl's pre-init warning, CPU features) on
# stderr before Python logging exists; 3 shows nothing (every error reaches Python as an exception,
# which the CLI words). Set before anything imports TensorFlow (the modules above do not); `main`
# overrides what the environment says unless --debug.
QUIET_TF_LOG_LEVEL = "3"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)

# The commands that import TensorFlow whatever the model (serve and demo never do). The others
# that run a model (evaluate, threshold, predict, explain) run it on LiteRT when the bundle has its
# flatbuffer, and import TensorFlow (quietly, `forward.import_tensorflow`) only if Keras must run.
TENSORFLOW_COMMANDS = ("train", "ood", "adapt", "export")


HOST_HELP = (
    "address to listen on (default 127.0.0.1); requests must name it, 127.0.0.1, localhost or ::1 "
    "as their Host (any IP address too with 0.0.0.0 or ::)"
)
PORT_HELP = "TCP port to listen on, 0 for any free one (default 8000)"
BATCH_HELP = "images per forward pass: more is faster and takes more memory (default %(default)s)"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {port}")
    return port


def _shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"shard must be K/N with 0 <= K < N, got {text!r}")
    return int(index), int(count)


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a model from scratch on a chest X-ray folder")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="ROOT/{train,val,test}/{NORMAL,PNEUMONIA} or ROOT/{NORMAL,PNEUMONIA}",
    )
    parser.add_argument("--out", required=True, type=Path, help="run folder to create or resume")
    parser.add_argument(
        "--arch",
        default=DEFAULTS.arch,
        help=", ".join(f"{name} ({recipe.description})" for name, recipe in RECIPES.items())
        + "".join(f"; {alias} is {name}" for alias, name in ARCH_ALIASES.items())
        + f" (default: {DEFAULTS.arch})",
    )
    parser.add_argument("--epochs", type=int, default=None, help="(default: the architecture's recipe)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per training step (default: the architecture's recipe)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side in pixels (default: the architecture's recipe)",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="(default: the architecture's recipe)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.random_seed,
        help="seeds the split, weights, order and augmentation (default %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULTS.val_fraction,
        help="share of the training films held out for val, whole patients at a time (default %(default)s)",
    )
    parser.add_argument(
        "--val-design",
        choices=VAL_DESIGNS,
        default=DEFAULTS.val_design,
        help="acquisition: val and internal-test hold the normals whose acquisition looks most like "
        "the pneumonia films' (selection under shift); random: patients drawn at random "
        f"(default: {DEFAULTS.val_design})",
    )
    parser.add_argument(
        "--acquisition-reweight",
        type=float,
        default=DEFAULTS.acquisition_reweight,
        help="weight training films by (1 / P(label | acquisition statistics)) ** F, so that how a "
        f"film was acquired stops predicting its label; 0 is off (default: {DEFAULTS.acquisition_reweight})",
    )
    parser.add_argument(
        "--mixup",
        type=float,
        default=DEFAULTS.mixup,
        help=f"blend training films in pairs, weight ~ Beta(A, A); 0 is off (default: {DEFAULTS.mixup})",
    )
    parser.add_argument(
        "--weight-average",
        type=float,
        default=DEFAULTS.weight_average_momentum,
        metavar="MOMENTUM",
        help="validate and keep an exponential moving average of the weights, this momentum per "
        f"step; 0 is off (default: {DEFAULTS.weight_average_momentum})",
    )
    parser.add_argument(
        "--exclude-files",
        type=Path,
        default=None,
        metavar="LIST",
        help="leave these training films out of training: a text file of paths relative to the "
        "training folder, one a line, or the JSON of benchmarks/robustness/label_noise.py (its suspects)",
    )
    parser.add_argument(
        "--test-time-shift",
        type=float,
        default=DEFAULTS.test_time_shift,
        metavar="F",
        help="the model's output on a film is the mean over the film and two copies moved "
        f"diagonally by F of the side; 0 is off (default: {DEFAULTS.test_time_shift})",
    )
    parser.add_argument(
        "--threshold-rule",
        default=str(DEFAULTS.threshold_rule),
        help="youden | sensitivity:0.95 | fixed:0.5, chosen on the val split "
        f"(default: {DEFAULTS.threshold_rule})",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=DEFAULTS.strategy,
        help="default (one device), mirrored (every local GPU) or multi-worker (TF_CONFIG); "
        "--batch-size is per replica",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULTS.precision,
        help="mixed_float16 needs a GPU (default %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    try:
        config = Config(
            arch=args.arch,
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            random_seed=args.seed,
            val_fraction=args.val_fraction,
            val_design=args.val_design,
            acquisition_reweight=args.acquisition_reweight,
            mixup=args.mixup,
            weight_average_momentum=args.weight_average,
            exclude_files=read_file_list(args.exclude_files) if args.exclude_files else (),
            test_time_shift=args.test_time_shift,
            threshold_rule=args.threshold_rule,
            strategy=args.strategy,
            precision=args.precision,
        ).resolved()
    except ValueError as error:
        raise UsageError(str(error)) from None
    from pneumoscan.training.run import train

    result = train(config, args.data, args.out, overwrite=args.overwrite)
    if result.wrote_run and not result.already_finished:
        print(f"\nRun folder: {result.run_dir}")
        print("Next:")
        print(f"  pneumoscan evaluate --model {result.run_dir} --data {args.data} --split internal-test")
        print(f"  pneumoscan export --model {result.run_dir} --out BUNDLE_DIR")
    return 0


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="clinical metrics with 95%% CIs, plots and a report")
    parser.add_argument(
        "--model", type=Path, default=None, help="run folder or bundle (default: the bundled model)"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset root or a split folder holding NORMAL/ and PNEUMONIA/",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "internal-test", "train"),
        help="which split of a dataset root (default: test)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="REPORT_DIR for metrics.json, plots, report.html"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH, help=BATCH_HELP)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from pneumoscan.evaluate import evaluate, format_table

    evaluation = evaluate(args.model, args.data, args.split, batch_size=args.batch_size)
    for note in evaluation.notes:
        print(f"pneumoscan: {note}", file=sys.stderr)
    if args.out is not None:
        from pneumoscan.report import write_report

        files = write_report(args.out, evaluation, data=args.data)
        print(f"Report: {args.out / 'report.html'} ({', '.join(files)})", file=sys.stderr)
    print(json.dumps(evaluation.result) if args.json else format_table(evaluation))
    return 0


def _add_threshold(commands) -> None:
    parser = commands.add_parser("threshold", help="re-choose the operating threshold on the val split")
    parser.add_argument("--model", type=Path, required=True, help="run folder or bundle to update")
    parser.add_argument("--data", required=True, type=Path, help="the dataset the model was trained on")
    parser.add_argument("--rule", required=True, help="youden | sensitivity:0.95 | fixed:0.5")
    parser.set_defaults(handler=_threshold)


def _threshold(args: argparse.Namespace) -> int:
    try:
        rule = ThresholdRule.parse(args.rule)
    except ValueError as error:
        raise UsageError(str(error)) from None
    from pneumoscan.calibrate import describe_calibration
    from pneumoscan.evaluate import rechoose_threshold

    meta = rechoose_threshold(args.model, args.data, rule)
    t, val = meta["threshold"], meta["metrics"]["val"]
    print(
        f"{args.model}: threshold {t['value']:.4f} ({t['rule']}, chosen on {t['split']}); "
        f"val sensitivity {val['sensitivity']:.3f}, specificity {val['specificity']:.3f}; "
        f"calibration {describe_calibration(meta['calibration'])}."
    )
    return 0


def _add_ood(commands) -> None:
    parser = commands.add_parser(
        "ood", help="refit the out-of-distribution flag and the borderline band of a model"
    )
    parser.add_argument("--model", type=Path, required=True, help="run folder or bundle to update")
    parser.add_argument("--data", required=True, type=Path, help="the dataset the model was trained on")
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH, help=BATCH_HELP)
    parser.set_defaults(handler=_ood)


def _ood(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {args.batch_size}")
    from pneumoscan.decision import describe_trust
    from pneumoscan.evaluate import refit_trust

    meta = refit_trust(args.model, args.data, args.batch_size)
    print(f"{args.model}: {describe_trust(meta)}")
    return 0


def _add_adapt(commands) -> None:
    parser = commands.add_parser(
        "adapt", help="fit a model's decision to a hospital's own films, with a cross-fitted estimate"
    )
    parser.add_argument("--data", required=True, type=Path, help="the site's films: NORMAL/ and PNEUMONIA/")
    parser.add_argument("--out", required=True, type=Path, help="the adapted bundle to write")
    parser.add_argument(
        "--model", type=Path, default=None, help="run folder or bundle to adapt (default: the bundled model)"
    )
    parser.add_argument(
        "--method",
        choices=("finetune", "recalibrate", "head"),
        default="finetune",
        help="finetune: the weights are fitted to the site's films, then calibration, threshold and "
        "band; recalibrate: the weights stay; head: only the output layer is refitted, on the "
        "model's frozen features (default %(default)s)",
    )
    parser.add_argument("--rule", default=None, help="threshold rule (default: sensitivity:0.97)")
    parser.add_argument("--site", default=None, help="the site's name (default: the --data folder's name)")
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        help="patient folds of the cross-fitted estimate (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="how patients are dealt into folds (default %(default)s)"
    )
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="finetune: mix films of the original training data (NORMAL/ and PNEUMONIA/, or a root "
        "with train/) into each epoch",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH, help=BATCH_HELP)
    parser.set_defaults(handler=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {args.batch_size}")
    from pneumoscan.adapt import adapt

    adapt(
        args.model,
        args.data,
        args.out,
        method=args.method,
        rule=args.rule,
        site=args.site,
        folds=args.folds,
        seed=args.seed,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        replay=args.replay,
        log=lambda line: print(line, file=sys.stderr),
    )
    return 0


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="predict files and folders (recursively)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument(
        "--model", type=Path, default=None, help="run folder or bundle (default: the bundled model)"
    )
    parser.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default=None,
        help="what stdout gets (default: table); csv writes the flags as True/False, json as true/false",
    )
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH, help=BATCH_HELP)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the records to FILE.csv or FILE.jsonl as they come, instead of stdout",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --output: skip the files already predicted in FILE (by absolute path; error "
        "records are tried again) and append; FILE must hold predict records",
    )
    parser.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="only shard K of N (0 <= K < N), by a stable hash of each path below its folder argument "
        "(Unicode NFC; a file named directly: its name): N copies with the same PATHs cover every file once",
    )
    parser.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from pneumoscan.predict import CSV_FIELDS, OUTPUT_SUFFIXES, csv_fields, expand_paths, resume

    fmt = _check_predict_args(args)
    items, skipped = expand_paths(args.paths, args.shard), 0
    if args.output is not None and args.output.exists():  # checked before the model loads
        try:
            items, skipped = resume(args.output, items)
        except ValueError as error:
            raise UsageError(str(error)) from None
    from pneumoscan.bundle import Bundle

    bundle = Bundle.load(args.model)
    if args.output is None:
        return _predict_to(sys.stdout, fmt or "table", bundle, items, args.batch_size, header=True)
    fresh = not args.output.exists() or args.output.stat().st_size == 0
    fmt = OUTPUT_SUFFIXES[args.output.suffix.lower()]
    fields = csv_fields(args.output) if fmt == "csv" and not fresh else CSV_FIELDS
    # surrogateescape: a file name that is not UTF-8 goes out as its own bytes, and --resume
    # reads it back as the same name.
    with open(args.output, "a", encoding="utf-8", errors="surrogateescape", newline="") as stream:
        return _predict_to(stream, fmt, bundle, items, args.batch_size, fresh, skipped, fields)


def _check_predict_args(args: argparse.Namespace) -> str | None:
    from pneumoscan.predict import OUTPUT_SUFFIXES

    if args.batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {args.batch_size}")
    if args.output is None:
        if args.resume:
            raise UsageError("--resume continues an --output FILE; pass --output too.")
        return args.format
    if args.output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--output {args.output}: name a .csv or .jsonl file (its suffix sets the format).")
    if args.format is not None:
        raise UsageError("--format sets what stdout gets; with --output the file's suffix sets its format.")
    if args.output.exists() and not args.resume:
        raise UsageError(f"{args.output}: exists; pass --resume to continue it, or choose another file.")
    return None


def _predict_to(
    stream, fmt: str, bundle, items: list, batch_size: int, header: bool, skipped: int = 0, fields=None
) -> int:
    """Records to `stream` as they come, each bad input's sentence to stderr, a progress bar on
    stderr when it is a terminal, the summary last; exit 1 when an input failed."""
    from pneumoscan.predict import CSV_FIELDS, RecordWriter, Tally, iter_predictions

    tally, fields = Tally(), fields or CSV_FIELDS
    with _progress(len(items)) as (advance, say), RecordWriter(stream, fmt, header, fields) as writer:
        for record in iter_predictions(bundle, items, batch_size):
            writer.write(record)
            tally.add(record)
            advance()
            if "error" in record:
                say(f"pneumoscan: {record['error']}")
            if "warning" in record:
                say(f"pneumoscan: warning: {record['warning']}")
    print(tally.line(skipped), file=sys.stderr)
    return FAILURE if tally.failed else 0


@contextlib.contextmanager
def _progress(total: int):
    """(advance, say): a progress bar on stderr when it is a terminal (rich), silent otherwise;
    `say` prints a line to stderr above the bar."""
    if not sys.stderr.isatty():
        yield (lambda: None), (lambda text: print(text, file=sys.stderr))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True, highlight=False)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("predicting", total=total)
        yield (lambda: progress.advance(task)), (lambda text: console.print(text, markup=False))


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export", help="write a model bundle: Keras, SavedModel, HDF5, TF.js and LiteRT"
    )
    parser.add_argument("--model", type=Path, required=True, help="run folder made by pneumoscan train")
    parser.add_argument("--out", type=Path, required=True, help="BUNDLE_DIR to create or replace")
    parser.add_argument(
        "--quantize",
        choices=("none", "float16", "uint8"),
        default="none",
        help="TF.js weight storage (default: none = float32)",
    )
    parser.add_argument(
        "--add-litert",
        action="store_true",
        help="--model is a bundle: copy its files unchanged to --out (may be the same folder) and "
        "add the LiteRT flatbuffer model.tflite and its metadata key",
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from pneumoscan.export import add_litert, export_bundle

    if args.add_litert:
        block = add_litert(args.model, args.out)  # ExportError: exit 2
        print(
            f"Bundle: {args.out} (+ {block['file']}, {block['bytes'] / 1e6:.2f} MB, sha256 {block['sha256']})"
        )
        return 0
    info = export_bundle(args.model, args.out, quantize=args.quantize)  # ExportError: exit 2
    print(
        f"Bundle: {args.out} ({', '.join(info['formats'])}; TF.js weights {args.quantize}, "
        f"{info['tfjs_bytes'] / 1e6:.2f} MB)"
    )
    print(f"Next: pneumoscan serve --model {args.out}")
    return 0


def _add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="serve the web app and a model bundle over HTTP")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="bundle made by pneumoscan export (default: the bundled model)",
    )
    parser.add_argument("--host", default="127.0.0.1", help=HOST_HELP)
    parser.add_argument("--port", type=_port, default=8000, help=PORT_HELP)
    parser.set_defaults(handler=_serve)


def _add_demo(commands) -> None:
    parser = commands.add_parser("demo", help="serve the web app with the bundled model")
    parser.add_argument("--host", default="127.0.0.1", help=HOST_HELP)
    parser.add_argument("--port", type=_port, default=8000, help=PORT_HELP)
    parser.set_defaults(handler=_serve, model=None)


def _serve(args: argparse.Namespace) -> int:
    from pneumoscan.bundle import bundled_dir
    from pneumoscan.serve import serve

    bundle = args.model or bundled_dir()
    if bundle is None:
        raise UsageError(
            "this installation has no bundled model; pass --model BUNDLE (made by pneumoscan export)."
        )
    serve(bundle, args.host, args.port)
    return 0


def _add_explain(commands) -> None:
    parser = commands.add_parser(
        "explain",
        help="heatmaps and marker checks: where does the model look?",
        description="Where the model looks, per image: peak (x, y) is the heatmap's centre of mass, in "
        "fractions of the image's width and height from its top-left corner (0 to 1); centre, border and "
        "corners are the shares of the map on the central box (the middle of the chest: lungs and "
        "mediastinum), the border band and the corner squares where R/L markers sit; marker is the largest "
        "change of the calibrated probability (0 to 1) when a bright marker is pasted into a corner or the "
        "corners are blacked out, near 0 for a model that ignores them. With --format json, png repeats "
        "heatmap_png under its earlier name.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument(
        "--model", type=Path, default=None, help="run folder or bundle (default: the bundled model)"
    )
    parser.add_argument(
        "--method",
        choices=("cam", "occlusion"),
        default="cam",
        help="cam: class activation map (Grad-CAM for models without global average pooling); "
        "occlusion: the drop when patches are hidden (default: cam)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("explanations"),
        help="folder for the overlays, <stem>_<method>.png (default: ./explanations)",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="(default: table)")
    parser.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    import json

    from pneumoscan.explain import explain_files, render

    records = explain_files(args.model, args.paths, args.out, method=args.method)
    print(json.dumps(records, indent=2) if args.format == "json" else render(records))
    for record in records:
        if "error" in record:
            print(f"pneumoscan: {record['error']}", file=sys.stderr)
        if "warning" in record:
            print(f"pneumoscan: warning: {record['warning']}", file=sys.stderr)
    print(f"Overlays: {args.out}", file=sys.stderr)
    return FAILURE if any("error" in r for r in records) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumoscan",
        description="Pneumonia screening on chest X-rays: train, evaluate, export to the browser, predict.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks, and TensorFlow's log as the environment sets it",
    )
    from pneumoscan import __version__

    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_threshold(commands)
    _add_adapt(commands)
    _add_ood(commands)
    _add_export(commands)
    _add_explain(commands)
    _add_serve(commands)
    _add_demo(commands)
    return parser


def _error_code(error: BaseException) -> int | None:
    """Exit code for an error a person can act on (its class says which); None for a bug."""
    if isinstance(error, PneumoscanError):
        return error.exit_code
    if isinstance(error, OSError):
        return FAILURE
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    forward.QUIET_IMPORT[0] = not args.debug
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints as \udcXX
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        if not args.debug:
            _quiet_tensorflow(args.command)
        return args.handler(args)
    except KeyboardInterrupt:
        print("pneumoscan: interrupted; the same command resumes where it stopped.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILURE
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        error = MissingExtra.of(error, args.command) or error  # the light install: one sentence
        code = _error_code(error)
        if code is None:
            print(
                f"pneumoscan: unexpected error: {type(error).__name__}: {error} "
                "(run with --debug for the traceback).",
                file=sys.stderr,
            )
            return FAILURE
        print(f"pneumoscan: error: {error}", file=sys.stderr)
        if isinstance(error, PneumoscanError) and error.exits_at_once:
            _exit_now[0] = code  # TensorFlow's broken collectives make a normal teardown spew or hang
        return code


def _quiet_tensorflow(command: str) -> None:
    """TensorFlow's start-up and Keras's advice kept off stderr; TensorFlow imported here by the
    commands that run a model. absl (TensorFlow's dependency) is absent from the light install."""
    if "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_LOG_LEVEL
        if command in TENSORFLOW_COMMANDS:
            forward.import_tensorflow()
    # Keras's advice through absl (e.g. "HDF5 is legacy" on export) is not the user's concern.
    with contextlib.suppress(ModuleNotFoundError):
        import absl.logging  # cheap, and TensorFlow's own dependency

        absl.logging.set_verbosity(absl.logging.ERROR)


_exit_now: list[int | None] = [None]


def run() -> None:
    # Keras imports scikit-learn at start-up whenever it is installed (for its scikit-learn
    # wrappers; here it is a test dependency), about 0.8 s of every command's start on a 2-core
    # machine. No pneumoscan command uses it, so the command's own process does without it.
    sys.modules.setdefault("sklearn", None)
    code = main()
    if _exit_now[0] is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
