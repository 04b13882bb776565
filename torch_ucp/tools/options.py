"""The error for a bad argument to a :mod:`torch_ucp.tools` function, worded for its caller.

The same check serves the Python API and the ``torch-ucp`` command, whose users spell an
option differently (``overwrite=True``, ``--overwrite``). An :class:`OptionError` message names
its option with the placeholder ``{option}``: ``str(e)`` fills in the Python spelling, the CLI
its flag (:meth:`OptionError.render`), as click's ``param_hint`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OPTION = "{option}"
"""The placeholder for the option's name in an :class:`OptionError` message."""


class OptionError(ValueError):
    """A bad argument (or combination of arguments) to an export or convert function.

    Attributes:
        option: the parameter at fault, as the Python keyword (``"strip_prefix"``).
        value: its value where the message should show it (``keys``' patterns,
            ``overwrite=True`` as the fix), else ``None``.
    """

    def __init__(self, message: str, option: str, value: Any = None) -> None:
        self.message = message
        self.option = option
        self.value = value
        super().__init__(self.render(python_spelling))

    def render(self, spell: Callable[[str, Any], str]) -> str:
        """The message with ``{option}`` spelled by ``spell(option, value)``."""
        return self.message.replace(OPTION, spell(self.option, self.value))


def python_spelling(option: str, value: Any) -> str:
    """``strip_prefix``, ``overwrite=True``, ``keys=['model.*']``."""
    return option if value is None else f"{option}={value!r}"
