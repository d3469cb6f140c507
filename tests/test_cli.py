"""pneumoscan.cli: exit codes and one-sentence errors, in-process through main(argv)."""

from __future__ import annotations

import pytest

from pneumoscan.cli import NOT_BUILT, main


@pytest.mark.parametrize(
    "argv, code, message",
    [
        ([], 2, "the following arguments are required: COMMAND"),
        (["train"], 2, "the following arguments are required: --data, --out"),
        (["train", "--data", "x", "--out", "y", "--epochs", "many"], 2, "invalid int value: 'many'"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/run"], 2, "missing: no such folder"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--epochs", "0"], 2, "epochs must be at least 1"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--arch", "vgg99"], 2,
         "unknown architecture 'vgg99'"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run"], 2, "expected class folders NORMAL/PNEUMONIA"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(argv, code, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", sorted(NOT_BUILT))
def test_commands_not_built_yet_say_so(command, capsys):
    assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error:") and "is not available in this version yet" in err
    assert err.count("\n") == 0


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pneumoscan 0.")
