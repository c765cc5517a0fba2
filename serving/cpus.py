"""How many CPUs this process may use: its affinity and its cgroup CPU quota.

``os.cpu_count()`` reports the host's CPUs. A process started with ``taskset``, or in a
Kubernetes pod with a CPU limit, may use fewer: the affinity mask bounds which CPUs it
runs on, and the cgroup quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` in v1) bounds how much CPU time it gets per period. Thread pools
sized to the host oversubscribe both, and the extra threads only add switching and
throttled quota. The runtimes' thread pools and ``--workers auto`` are sized from here.

Example:

```python
budget = cpu_budget()
budget.count  # e.g. 2 in a pod with `limits: cpu: "1500m"` on a 16-core node
```
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class CpuBudget:
    """The CPUs a process may use.

    Attributes:
        affinity: CPUs in the process's affinity mask.
        quota: CPUs' worth of time the cgroup quota allows per period, or None without
            a quota.
        count: Whole CPUs to size thread pools for: the affinity, capped by the quota
            rounded up, at least 1.
    """

    affinity: int
    quota: float | None
    count: int

    def describe(self) -> str:
        """``"2 CPUs (affinity 16, cgroup quota 1.5)"``, for log lines."""
        quota = f", cgroup quota {self.quota:g}" if self.quota is not None else ""
        return f"{self.count} CPU{'s' if self.count != 1 else ''} (affinity {self.affinity}{quota})"


def budget_from(affinity: int, quota: float | None) -> CpuBudget:
    """Combines an affinity size and a quota into a :class:`CpuBudget` (a pure function).

    Args:
        affinity: CPUs in the affinity mask (at least 1 is assumed).
        quota: CPUs' worth of quota, or None.

    Returns:
        The budget; ``count`` is ``min(affinity, ceil(quota))``, at least 1.

    Example:

    >>> budget_from(16, 1.5).count
    2
    """
    affinity = max(1, affinity)
    count = affinity if quota is None else min(affinity, max(1, math.ceil(quota - 1e-9)))
    return CpuBudget(affinity=affinity, quota=quota, count=count)


def parse_cpu_max(text: str) -> float | None:
    """The quota in CPUs of a cgroup v2 ``cpu.max`` file (``"max 100000"`` or ``"150000 100000"``)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period if period > 0 else None


def parse_cfs(quota_us: str, period_us: str) -> float | None:
    """The quota in CPUs of cgroup v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1 = none)."""
    quota, period = int(quota_us.strip()), int(period_us.strip())
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """The v2 path and the v1 ``cpu`` controller path of ``/proc/self/cgroup``."""
    v2: str | None = None
    v1: str | None = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, path: str) -> list[Path]:
    # The tightest limit anywhere up the hierarchy applies; a namespaced container sees its
    # own cgroup as the root, so the root itself is checked too.
    parts = [p for p in path.split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs.

    Args:
        root: The cgroup file system's mount point. Defaults to ``/sys/fs/cgroup``.
        proc_cgroup: The text of ``/proc/self/cgroup``. Defaults to reading it.

    Returns:
        The quota, or None when no cgroup sets one (or none can be read).
    """
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    v2, v1 = _cgroup_paths(proc_cgroup)
    quotas: list[float] = []
    if v2 is not None:
        for folder in _ancestors(root, v2):
            try:
                quota = parse_cpu_max((folder / "cpu.max").read_text())
            except (OSError, ValueError):
                continue
            if quota is not None:
                quotas.append(quota)
    if v1 is not None:
        for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            for folder in _ancestors(root / mount, v1):
                try:
                    quota = parse_cfs(
                        (folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text()
                    )
                except (OSError, ValueError):
                    continue
                if quota is not None:
                    quotas.append(quota)
    return min(quotas) if quotas else None


def cpu_budget() -> CpuBudget:
    """The CPUs this process may use now (affinity and cgroup quota)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return budget_from(affinity, cgroup_quota())
