"""The `pneumoscan` command: `pneumoscan {train,evaluate,predict,threshold,export,explain,serve,demo}`.

`main(argv) -> int` runs in-process (the tests call it); `run()` is the console script.
Usage errors exit 2, failures exit 1, each with one sentence on stderr and no traceback
unless `--debug` is given. TensorFlow is imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

USAGE_ERROR, FAILURE = 2, 1
NOT_BUILT = {
    "evaluate": "evaluation",
    "predict": "prediction",
    "threshold": "threshold selection",
    "export": "export",
    "explain": "explanation maps",
    "serve": "the web server",
    "demo": "the browser demo",
}


class UsageError(Exception):
    """A mistake in the command line: exit 2."""


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a model from scratch on a chest X-ray folder")
    parser.add_argument("--data", required=True, type=Path,
                        help="ROOT/{train,val,test}/{NORMAL,PNEUMONIA} or ROOT/{NORMAL,PNEUMONIA}")
    parser.add_argument("--out", required=True, type=Path, help="run folder to create or resume")
    parser.add_argument("--arch", default="seed", help="architecture (default: seed, the paper's CNN)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side in pixels (default: the architecture's own)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--threshold-rule", default="youden",
                        help="youden | sensitivity:0.95 | fixed:0.5 (chosen on the val split)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from pneumoscan.config import Config

    try:
        config = Config(arch=args.arch, image_size=args.image_size, epochs=args.epochs,
                        batch_size=args.batch_size, learning_rate=args.learning_rate,
                        seed=args.seed, val_fraction=args.val_fraction,
                        threshold_rule=args.threshold_rule).resolved()
    except ValueError as error:
        raise UsageError(str(error)) from None
    from pneumoscan.train import train

    result = train(config, args.data, args.out, overwrite=args.overwrite)
    if not result.already_finished:
        print(f"\nRun folder: {result.run_dir}")
        print("Next:")
        print(f"  pneumoscan evaluate --model {result.run_dir} --data {args.data} --split internal-test")
        print(f"  pneumoscan export --model {result.run_dir} --out BUNDLE_DIR")
    return 0


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise UsageError(f"'pneumoscan {name}' ({NOT_BUILT[name]}) is not available in this version yet.")

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumoscan",
        description="Pneumonia screening on chest X-rays: train, evaluate, export to the browser, predict.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    from pneumoscan import __version__

    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    for name, what in NOT_BUILT.items():
        sub = commands.add_parser(name, help=f"{what} (not available yet)")
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(handler=_not_built(name))
    return parser


def _error_code(error: BaseException) -> int | None:
    """Exit code for an error a person can act on; None for a bug."""
    from pneumoscan.data import DataError
    from pneumoscan.metadata import MetadataError
    from pneumoscan.preprocess import ImageError

    usage = [UsageError, DataError]
    if "pneumoscan.train" in sys.modules:
        usage.append(sys.modules["pneumoscan.train"].RunConflict)
    if isinstance(error, tuple(usage)):
        return USAGE_ERROR
    if isinstance(error, (MetadataError, ImageError, OSError)):
        return FAILURE
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("pneumoscan: interrupted; the same command resumes where it stopped.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns errors into exit codes
        if args.debug:
            traceback.print_exc()
        code = _error_code(error)
        if code is None:
            print(f"pneumoscan: unexpected error: {type(error).__name__}: {error} "
                  "(run with --debug for the traceback).", file=sys.stderr)
            return FAILURE
        print(f"pneumoscan: error: {error}", file=sys.stderr)
        return code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
