"""Damaged copies of valid DICOM, PNG and JPEG files (bytes flipped, cut short, inserted, header
fields rewritten), a fixed seed, a few hundred cases through Python's decoder and as many through
the page's, in Node: each case decodes or is refused in one sentence naming the file (one line,
a full stop, no raw bytes); no other exception, no hang. The generator and the runners are
`benchmarks/robustness/fuzz_decode.py`, which runs thousands."""

from __future__ import annotations

import pytest

from conftest import load_benchmark, needs_node

fuzz = load_benchmark("robustness/fuzz_decode")
CASES = 400  # of each side: ~0.2 s for Python, ~1 s for the page in Node
SEED = 20


@pytest.fixture(scope="module")
def cases():
    return fuzz.damaged(fuzz.seed_files(), CASES, SEED)


def _check(outcomes) -> None:
    assert outcomes.failures == []
    # The damage is neither all fatal nor all harmless: both outcomes occur, for every format.
    assert outcomes.counts["decoded"] >= CASES // 10 and outcomes.counts["refused"] >= CASES // 10


def test_python_decodes_or_refuses_every_damaged_file_in_one_sentence(cases):
    _check(fuzz.python_side(cases))


@needs_node
def test_the_page_decodes_or_refuses_every_damaged_file_in_one_sentence(cases, tmp_path):
    _check(fuzz.page_side(cases, fuzz.bundled_metadata(), tmp_path))


def test_the_cases_are_the_same_for_a_seed_and_cover_every_damage(cases):
    again = fuzz.damaged(fuzz.seed_files(), CASES, SEED)
    assert [name for name, _ in again] == [name for name, _ in cases]
    assert {name.rsplit(" ", 1)[1].split(".")[0] for name, _ in cases} == set(fuzz.DAMAGES)
    assert {name.rsplit(".", 1)[1] for name, _ in cases} == {"dcm", "png", "jpeg"}
