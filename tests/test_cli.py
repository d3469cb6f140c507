"""pneumoscan.cli: exit codes and one-sentence errors, in-process through main(argv)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLES
from pneumoscan.cli import build_parser, main


@pytest.mark.parametrize(
    "argv, code, message",
    [
        ([], 2, "the following arguments are required: COMMAND"),
        (["train"], 2, "the following arguments are required: --data, --out"),
        (["train", "--data", "x", "--out", "y", "--epochs", "many"], 2, "invalid int value: 'many'"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/run"], 2, "missing: no such folder"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--epochs", "0"], 2, "epochs must be at least 1"),
        (
            ["train", "--data", "{tmp}", "--out", "{tmp}/run", "--arch", "vgg99"],
            2,
            "unknown architecture 'vgg99'",
        ),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run"], 2, "expected class folders NORMAL/PNEUMONIA"),
        (
            ["train", "--data", "{tmp}", "--out", "{tmp}/run", "--threshold-rule", "bogus"],
            2,
            "threshold rule 'bogus' is not understood",
        ),
        (["serve", "--port", "99999"], 2, "port must be between 0 and 65535, got 99999"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--mixup", "-1"], 2, "mixup must be in [0, 10]"),
        (
            ["train", "--data", "{tmp}", "--out", "{tmp}/run", "--test-time-shift", "0.5"],
            2,
            "test-time shift must be in [0, 0.25]",
        ),
        (
            ["train", "--data", "{tmp}", "--out", "{tmp}/run", "--exclude-files", "{tmp}/none.txt"],
            2,
            "none.txt: cannot read the list of files to exclude",
        ),
        (
            ["train", "--data", "{tmp}", "--out", "{tmp}/run", "--exclude-files", "{tmp}/bad.json"],
            2,
            "bad.json: not a list of files to exclude",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(argv, code, message, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"suspects": [{"path": "NORMAL/a.jpeg"}]}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


COMMANDS = ["train", "evaluate", "predict", "threshold", "ood", "export", "explain", "serve", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: pneumoscan {command}" in capsys.readouterr().out


def _cli_flags() -> dict[tuple[str, str], argparse.Action]:
    """(command, --flag) -> its action, for every subcommand; "(any)" for the top-level flags."""
    parser = build_parser()
    flags = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                for option in sub._actions:
                    for flag in option.option_strings:
                        if flag.startswith("--") and flag != "--help":
                            flags[command, flag] = option
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                flags["(any)", flag] = action
    return flags


def _readme_flag_rows() -> dict[tuple[str, str], str]:
    """(command, --flag) -> the default cell of each row of README's flag table."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        match = re.fullmatch(r"\| ([\w()-]+) \| `(--[\w-]+)` \|([^|]*)\|.*", line)
        if match:
            rows[match[1], match[2]] = match[3].strip()
    return rows


def test_every_cli_flag_has_a_readme_row_with_its_default():
    flags, rows = _cli_flags(), _readme_flag_rows()
    assert len(flags) > 40
    assert sorted(set(flags) - set(rows)) == [], "flags without a README row"
    assert sorted(set(rows) - set(flags)) == [], "README rows of flags the CLI does not have"
    for key, action in flags.items():
        cell = rows[key]
        assert ("(required)" in cell) == bool(action.required), key
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"`{action.default}`" in cell, (key, action.default, cell)


def test_serve_refuses_a_bundle_without_tfjs(trained_run, capsys):
    _, run_dir = trained_run  # a run folder: metadata.json and model.keras, no tfjs/
    assert main(["serve", "--model", str(run_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "run pneumoscan export first" in err and "Traceback" not in err


def test_demo_without_a_bundled_model_says_so(monkeypatch, capsys):
    from pneumoscan import bundle

    monkeypatch.setattr(bundle, "bundled_dir", lambda: None)
    assert main(["demo", "--port", "0"]) == 2
    assert "no bundled model" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pneumoscan 0.")


def test_tensorflow_start_up_chatter_is_silenced_unless_debug(tmp_path):
    """TF_CPP_MIN_LOG_LEVEL=0 in the environment makes TensorFlow print absl's pre-init warning and
    its CPU-feature notice on stderr at import; the CLI keeps them out unless --debug. TensorFlow
    runs a bundle without its LiteRT flatbuffer (a copy of the bundled model without it); the
    bundled model itself runs on LiteRT, whose start-up line (XNNPACK) stays out too."""
    from pneumoscan.bundle import bundled_dir

    image = str(SAMPLES / "NORMAL" / "IM-0115-0001.jpeg")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    keras_only = shutil.copytree(
        bundled_dir(), tmp_path / "bundle", ignore=shutil.ignore_patterns("*.tflite")
    )

    def stderr(*flags: str, model=keras_only) -> str:
        command = [sys.executable, "-m", "pneumoscan", *flags, "predict", "--model", str(model)]
        command += ["--format", "csv", image]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=True)
        return result.stderr

    quiet, chatty = stderr(), stderr("--debug")
    assert quiet.splitlines() == ["1 image(s) predicted (1 NORMAL); 0 failed."]
    assert "absl::InitializeLog" in chatty  # the noise is real, and --debug keeps it
    assert stderr(model=bundled_dir()).splitlines() == ["1 image(s) predicted (1 NORMAL); 0 failed."]


def test_every_cli_flag_has_help_that_gives_its_default():
    """Issue 23: `serve`/`demo` --host/--port and every --batch-size lacked help and defaults."""
    missing, no_default = [], []
    for key, action in _cli_flags().items():
        words = action.help or ""
        if not words.strip() or words == argparse.SUPPRESS:
            missing.append(key)
        elif action.default not in (None, False, argparse.SUPPRESS) and "default" not in words:
            no_default.append(key)
    assert missing == [] and no_default == [], (missing, no_default)
