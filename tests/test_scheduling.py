"""Modules with a slow test run first, each group in its shuffled order (tests/scheduling.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest

from tests.scheduling import heavy_first


@dataclass
class _Item:
    nodeid: str
    slow: bool = False

    def get_closest_marker(self, name: str) -> Any:
        return object() if name == "slow" and self.slow else None


def _ids(items: list[pytest.Item]) -> list[str]:
    return [item.nodeid for item in items]


def test_a_module_with_one_slow_test_moves_ahead_whole_and_the_orders_hold() -> None:
    shuffled = [
        _Item("tests/c.py::one"),
        _Item("tests/a.py::one"),
        _Item("tests/b.py::quick"),
        _Item("tests/b.py::long", slow=True),
        _Item("tests/d.py::long", slow=True),
        _Item("tests/a.py::two"),
    ]
    ordered = heavy_first(cast(list[pytest.Item], shuffled))
    assert _ids(ordered) == [
        "tests/b.py::quick",
        "tests/b.py::long",
        "tests/d.py::long",
        "tests/c.py::one",
        "tests/a.py::one",
        "tests/a.py::two",
    ]


def test_without_slow_tests_the_shuffled_order_is_kept() -> None:
    shuffled = [_Item("tests/z.py::x"), _Item("tests/a.py::y"), _Item("tests/m.py::z")]
    assert _ids(heavy_first(cast(list[pytest.Item], shuffled))) == [
        "tests/z.py::x",
        "tests/a.py::y",
        "tests/m.py::z",
    ]
