"""The error every user-facing failure of the offline tools raises."""

from __future__ import annotations


class ModelloopError(Exception):
    """A failure caused by the user's input, reported in one line without a traceback.

    The CLI catches it, prints ``modelloop: error: <message>`` and exits non-zero.
    """
