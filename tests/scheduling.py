"""Heavy modules first: the shuffled suite on two workers without a long module drawn last.

``make test`` hands whole modules to two pytest-xdist workers in the shuffled order
(``--dist loadfile --no-loadscope-reorder``). When the shuffle draws a module of a minute or
two (a retrain loop, the health page) near the end, one worker runs it alone while the
other has nothing left: the same suite took 11 to 13 minutes by the seed alone. So, after
the shuffle, every module with a test marked ``slow`` moves ahead of the others, in the
shuffled order among themselves, and the others follow in theirs: the long modules spread
over both workers first, and the short ones fill in behind them (longest first, the usual
rule for scheduling on a few machines). Both groups are still shuffled by the seed, and
every module must still pass alone and in any order.
"""

from __future__ import annotations

import pytest


def module_of(item: pytest.Item) -> str:
    """The module part of a test's node id (``tests/e2e/test_loop_e2e.py``)."""
    return item.nodeid.split("::", 1)[0]


def heavy_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items, modules with a ``slow`` test first; each group keeps its order.

    Args:
        items: The collected (and shuffled) items.

    Returns:
        The same items, reordered.
    """
    heavy = {module_of(item) for item in items if item.get_closest_marker("slow") is not None}
    return sorted(items, key=lambda item: module_of(item) not in heavy)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs after the shuffle (pytest-random-order's hook) and the ``-m``/``-k`` selection."""
    items[:] = heavy_first(items)
