"""The tiny export every evaluation test module reads (built once per module, in its own folder)."""

import pytest

from tiny_export import build_tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("tiny_export"))
