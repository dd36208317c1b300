from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from continual.drift import categorical, estimate, ks, mmd


@pytest.mark.parametrize("module", [mmd, ks, categorical, estimate], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
