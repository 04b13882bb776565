"""A pickle payload for the trust tests: unpickling it creates a marker file (what an attacker's
``os.system`` would do), so a test can tell whether anything unpickled it."""

from __future__ import annotations

import pathlib


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))
