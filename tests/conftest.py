"""Shared fixtures: generated image trees here, real servers (S3, MLflow, Ray) in fixtures_infra."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.imagetree import Tree, make_tree

pytest_plugins = ["tests.fixtures_infra"]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """A small train split with every defect real ImageNet has (see tests/imagetree.py)."""
    return make_tree(tmp_path / "src")
