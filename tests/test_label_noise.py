"""benchmarks/robustness/label_noise.py: the confident joint's suspects and patient-grouped folds."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark

label_noise = load_benchmark("robustness/label_noise")


@pytest.mark.parametrize(
    "labels, probabilities, suspects",
    [
        ([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.1, 0.9, 0.8, 0.9], []),  # every film on its side
        ([0, 0, 0, 0, 1, 1, 1], [0.1, 0.1, 0.1, 0.95, 0.9, 0.9, 0.9], [3]),  # a normal it calls sick
        ([0, 0, 0, 1, 1, 1, 1], [0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.05], [6]),  # a pneumonia it calls normal
        ([0, 0, 1, 1], [0.45, 0.55, 0.45, 0.55], [1, 2]),  # t = 0.5 for both: each past the other
    ],
)
def test_confident_joint_puts_films_confidently_in_the_other_class_off_the_diagonal(
    labels, probabilities, suspects
):
    found = label_noise.confident_joint_suspects(np.array(labels), np.array(probabilities))
    assert found.tolist() == suspects


def test_folds_keep_groups_whole_and_about_equal():
    groups = [i // 3 for i in range(60)] + list(range(100, 140))
    folds = label_noise.folds_of(groups, 5, seed=0)
    for group in set(groups):
        assert len({folds[i] for i, g in enumerate(groups) if g == group}) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 3


@pytest.mark.parametrize(
    "relpath, family",
    [
        ("NORMAL/NORMAL2-IM-0383-0001.jpeg", "NORMAL2-IM"),
        ("NORMAL/IM-0115-0001.jpeg", "IM"),
        ("PNEUMONIA/person1_bacteria_1.jpeg", "bacteria"),
        ("PNEUMONIA/person10_virus_35.jpeg", "virus"),
        ("NORMAL/scan.png", "other"),
    ],
)
def test_families_of_file_names(relpath, family):
    assert label_noise.family(relpath) == family
