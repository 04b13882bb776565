"""The ``torch-ucp`` console script of the environment running the tests."""

from __future__ import annotations

import os
import shutil
import sys

_BESIDE = os.path.join(os.path.dirname(sys.executable), "torch-ucp")
# the script beside this interpreter, not one of another environment earlier on PATH
TORCH_UCP = _BESIDE if os.path.exists(_BESIDE) else shutil.which("torch-ucp") or _BESIDE
