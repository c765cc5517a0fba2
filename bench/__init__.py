"""The modelloop benchmark suite: ``make bench`` (``python -m bench``).

Not part of the installed package: it drives a real ``modelloop serve`` process and the
reference servers beside it with ``wrk`` and ``h2load``, pinned to separate CPUs.
"""
