"""`make test` fails, instead of skipping, when the browser tests cannot run: the Makefile sets
$PNEUMOSCAN_REQUIRE_BROWSER=1 (after installing Chromium and the npm packages), and a test
that needs Chromium or Node then fails with one sentence. Outside `make test` it is skipped.

Checked by running pytest in a subprocess with Chromium or Node made unfindable; the missing
piece fails or skips the test before any model is trained or any process is started.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, REQUIRE_BROWSER

pytestmark = pytest.mark.slow

MAKEFILE = REPO / "Makefile"
# (file, test): selected with -k, so that a module skipped whole still reports "1 skipped".
WEB_TEST = ("tests/test_web.py", "test_page_text_and_controls")
NODE_TEST = ("tests/test_preprocess_js.py", "test_png_python_and_page_agree")
# (test, environment that hides what it needs, required?, the outcome, words of the sentence)
CASES = [
    (WEB_TEST, {"CHROMIUM": "/nonexistent/chromium"}, True, "1 error", "need Chromium ($CHROMIUM is"),
    (WEB_TEST, {"CHROMIUM": "/nonexistent/chromium"}, False, "1 skipped", "need Chromium ($CHROMIUM is"),
    (NODE_TEST, {"PATH": "/nonexistent"}, True, "1 error", "needs `node`"),
    (NODE_TEST, {"PATH": "/nonexistent"}, False, "1 skipped", "needs `node`"),
]


@pytest.mark.parametrize(
    "test, hidden, required, outcome, sentence",
    CASES,
    ids=["web, make test", "web", "node, make test", "node"],
)
def test_missing_browser_fails_under_make_test_and_skips_elsewhere(
    tmp_path, test, hidden, required, outcome, sentence
):
    environment = {key: value for key, value in os.environ.items() if key != REQUIRE_BROWSER}
    environment.update(hidden)
    if required:
        environment[REQUIRE_BROWSER] = "1"
    path, name = test
    pytest_options = ["-q", "-rA", "-p", "no:cacheprovider", "--basetemp", str(tmp_path), "-k", name]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_options, path],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert outcome in output.splitlines()[-1], output[-3000:]
    assert sentence in output, output[-3000:]
    if required:
        assert result.returncode == 1, output[-3000:]
        assert f"{REQUIRE_BROWSER}=1 (make test) makes this a failure, not a skip." in output
    else:  # 5: "no tests ran", when a whole module is skipped at import
        assert result.returncode in (0, 5), output[-3000:]


def test_make_test_requires_the_browser():
    """The `test` target sets the variable for pytest (and installs what it asks for)."""
    recipe = MAKEFILE.read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert f"{REQUIRE_BROWSER}=1" in recipe
    assert "browser" in recipe.splitlines()[0] and "node" in recipe.splitlines()[0]
