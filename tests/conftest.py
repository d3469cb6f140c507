"""Shared fixtures: synthetic X-ray-like images in tmp_path and the committed real samples."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "chest_xray"
SHARED_DATA = REPO.parent / "shared" / "data" / "chest_xray"


def synthetic_xray(seed: int, label: int, size: tuple[int, int] = (72, 64)) -> np.ndarray:
    """A uint8 grayscale image whose brightness pattern depends on the label (learnable)."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[0:height, 0:width]
    base = 60 + 40 * np.sin(xx / 7.0) + rng.normal(0, 12, (height, width))
    if label:  # "opacity": a bright blob in one lung field
        cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
        base += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (width / 6) ** 2))
    return np.clip(base, 0, 255).astype(np.uint8)


def write_class_folders(
    root: Path, patients: dict[str, int], images_per_patient: int = 2, fmt: str = "png"
) -> Path:
    """root/{NORMAL,PNEUMONIA}/<patient>-<k>.<fmt> for `patients` {id: label}."""
    for i, (patient, label) in enumerate(sorted(patients.items())):
        folder = root / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_patient):
            name = (
                f"{patient}_{'bacteria' if label else ''}{k}.{fmt}"
                if patient.startswith("person")
                else f"{patient}-000{k + 1}.{fmt}"
            )
            Image.fromarray(synthetic_xray(1000 * i + k, label)).save(folder / name)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A single split folder: 12 NORMAL and 12 PNEUMONIA patients, 2 images each."""
    patients = {f"IM-{100 + i:04d}": 0 for i in range(12)}
    patients.update({f"person{i + 1}": 1 for i in range(12)})
    return write_class_folders(tmp_path / "xray", patients)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root with train/ only, run folder) for a 2-epoch seed model at 64x64."""
    from pneumoscan.config import Config
    from pneumoscan.train import train

    root = tmp_path_factory.mktemp("dataset")
    patients = {f"IM-{100 + i:04d}": 0 for i in range(15)}
    patients.update({f"person{i + 1}": 1 for i in range(15)})
    write_class_folders(root / "train", patients)
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train(Config(arch="seed", image_size=64, epochs=2, batch_size=8, seed=1), root, run_dir)
    return root, run_dir
