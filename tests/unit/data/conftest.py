"""Fixtures of the data tests."""

from pathlib import Path

import pytest
from coco_cases import write_six_images


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """6 images (landscape and portrait), polygons + RLE + crowd, one image without annotations."""
    return write_six_images(tmp_path)
