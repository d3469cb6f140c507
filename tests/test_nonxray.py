"""benchmarks/trust/nonxray.py: the synthetic non-X-rays are the same pixels on every machine."""

from __future__ import annotations

import hashlib
from importlib import util

import numpy as np
import pytest
from PIL import ImageFont

from conftest import load_benchmark

nonxray = load_benchmark("trust/nonxray")

# sha256 of repr(shape) + pixel bytes, seed 0. Documents and the ultrasound fan (modality 0)
# carry text; photos crop matplotlib's photograph. A change here changes every OOD figure
# measured on these sets (BENCHMARKS.md, "Trust"), so it must be deliberate.
PINNED = (
    (("pattern", 0), "94f8a805e17d9f6a2012f36a9b79436c08f3f75cb5766fcb23672ad086a67970"),
    (("document", 0), "09806093b19be2c433cd4f71888ce649baba526494e881767a2c0a00214e18f5"),
    (("document", 2), "51a27b82d547a503741f6d091a0ced1b22852c20ce22d2d1c40a570239c77928"),
    (("photo", 0), "e178f04faa7af6d91fb46e03fd45e654d6753012102e95003c0f9810de63f2a5"),
    (("photo", 1), "9a5b1adab99783946f9fc36f930002e859a7d21daa73a8cc0be15d5982cb6823"),
    (("microscopy", 0), "f07cdce26222f2d5df634b22740ec970d7329e99ba1cbed83a5832703aa3d515"),
    (("modality", 0), "94bdacaed41854e1635c410e2ae68e270b026bdc2b88486bb6ed8a8b0fbdbb94"),
)


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


@pytest.mark.parametrize(("key", "expected"), PINNED, ids=[f"{k}-{i}" for (k, i), _ in PINNED])
def test_generated_pixels_are_pinned(key, expected):
    kind, index = key
    pixels = nonxray.generate(kind, index)
    assert pixels.dtype == np.uint8 and pixels.ndim in (2, 3)
    assert digest(pixels) == expected


def test_pixels_do_not_depend_on_scikit_learn_or_freetype(monkeypatch):
    """The same digests with scikit-learn hidden and every FreeType entry point refusing: the
    text is Pillow's bitmap font, the photographs matplotlib's alone."""
    real_find_spec = util.find_spec

    def without_sklearn(name, *args, **kwargs):
        return None if name.split(".")[0] == "sklearn" else real_find_spec(name, *args, **kwargs)

    def no_freetype(*args, **kwargs):
        raise AssertionError("a FreeType font was asked for")

    monkeypatch.setattr(util, "find_spec", without_sklearn)
    monkeypatch.setattr(ImageFont, "truetype", no_freetype)
    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    for (kind, index), expected in PINNED:
        assert digest(nonxray.generate(kind, index)) == expected, (kind, index)


def test_seed_and_index_change_the_pixels_and_unknown_kinds_are_refused():
    first = nonxray.generate("document", 0)
    assert digest(nonxray.generate("document", 0, seed=1)) != digest(first)
    assert digest(nonxray.generate("document", 1)) != digest(first)
    with pytest.raises(ValueError, match="unknown kind 'xray'"):
        nonxray.generate("xray", 0)
