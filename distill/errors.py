"""The one exception users see: a sentence they can act on, never a traceback."""

from __future__ import annotations


class DistillError(Exception):
    """A problem with the user's input or environment, worded as one actionable sentence.

    DataLoader workers re-raise exceptions with their traceback folded into the
    message; `sentence` recovers the original words so the CLI can still print
    one line.
    """

    @property
    def sentence(self) -> str:
        text = str(self)
        if "Original Traceback" in text:
            last = text.strip().splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__name__}: "
            text = last.split(prefix, 1)[-1] if prefix in last else last
        return text


class ProcessStalled(DistillError):
    """Another process stopped showing progress while this one waited for it: said by the process that waited,
    whichever it is (process 0 may be the one that stalled)."""
