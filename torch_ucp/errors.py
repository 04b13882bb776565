"""Exceptions raised by torch_ucp. Each message names the tensor, the object and what was expected.

Every problem with a checkpoint or with the state being saved or loaded is a
:class:`CheckpointError`; the subclasses say which kind (and several also derive from the
built-in exception a caller would expect: ``FileNotFoundError``, ``FileExistsError``,
``ValueError``, ``KeyError``). Wrong arguments to a torch_ucp function (a negative thread
count, ``overwrite="no"``) are ordinary ``TypeError``/``ValueError``, as in the standard library
(:class:`OptionError`, a ``ValueError``, where the message must name the option).
Through ``dcp.save``/``dcp.load`` every rank's error arrives wrapped in DCP's
``CheckpointException``: :func:`rank_error` takes it out (``torch_ucp.save``/``load`` do).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable


class CheckpointError(Exception):
    """Base class of every torch_ucp error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (no metadata object) at the URL."""


class UnsupportedFormatError(CheckpointError):
    """The metadata is not a torch_ucp checkpoint, or of a format version this build cannot read."""


class NotStockCheckpointError(UnsupportedFormatError, pickle.UnpicklingError):
    """A stock DCP reader (``FileSystemReader``, ``FsspecReader``) was pointed at a torch_ucp
    checkpoint; the message names the torch_ucp calls to use. Still an ``UnpicklingError``,
    what the stock reader raised before, so existing handlers keep working."""


class CorruptCheckpointError(CheckpointError):
    """A data object is missing, truncated, or fails its checksum."""


class LoadPlanError(CheckpointError, ValueError):
    """The target state dict does not fit the checkpoint (missing/unexpected keys, shapes)."""


class SavePlanError(CheckpointError, ValueError):
    """The state dict cannot be saved as given: shards that overlap or leave a gap, ranks that
    disagree on a tensor, a ``Partial`` placement, a meta tensor, a planner reused across
    saves."""


class PatternError(CheckpointError, ValueError):
    """A pattern list that is malformed, ambiguous, unused, or impossible for a tensor."""


class KeyNotFoundError(CheckpointError, KeyError):
    """A key that is not in the checkpoint (or not a tensor / value, as asked)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already lives at the URL and ``overwrite`` was not set."""


class UnsafeCheckpointError(CheckpointError):
    """Reading or writing this needs an explicit opt-in: a value stored with pickle
    (``allow_pickle=True``) or a data object that is a symbolic link (``follow_symlinks=True``)."""


class CommitConflictError(CheckpointError):
    """Another save committed at the URL while this one ran (or removed its data): nothing of
    this save was committed, and its own data was removed."""


class ContentMismatchError(CorruptCheckpointError):
    """``verify_load``: the content loaded into the target differs from what was saved (the
    layout-independent content hash of the loaded shards does not match the header's).
    ``tensors`` names them."""

    def __init__(self, message: str, *, tensors: list[str]) -> None:
        super().__init__(message)
        self.tensors = list(tensors)

    def __reduce__(self):  # DCP pickles rank errors to every rank
        return (_content_mismatch, (str(self), self.tensors))


def _content_mismatch(message: str, tensors: list[str]) -> ContentMismatchError:
    return ContentMismatchError(message, tensors=tensors)


class SharedReadError(CheckpointError):
    """Bytes that one rank reads for several (``share_reads``) could not be read or delivered.

    Raised on the rank whose read failed and on every rank it reads for; ``source_rank`` is the
    rank whose read failed, and the message names the tensors."""

    def __init__(self, message: str, *, source_rank: int) -> None:
        super().__init__(message)
        self.source_rank = source_rank

    def __reduce__(self):  # DCP pickles rank errors to every rank
        return (_shared_read_error, (str(self), self.source_rank))


def _shared_read_error(message: str, source_rank: int) -> SharedReadError:
    return SharedReadError(message, source_rank=source_rank)
class OptionError(ValueError):
    """A wrong argument (or combination of arguments) to a :mod:`torch_ucp.tools` function,
    whose message names the option so that each caller can spell it its own way.

    The same check serves the Python API and the ``torch-ucp`` command, whose users write an
    option differently (``overwrite=True``, ``--overwrite``): the message holds the placeholder
    ``{option}``; ``str(e)`` spells it as the Python keyword, :meth:`render` as the caller
    wants (the CLI as its flag).

    Attributes:
        template: the message with ``{option}`` where the option's name goes.
        option: the parameter at fault, as the Python keyword (``"strip_prefix"``).
        value: its value where the message shows it (``overwrite=True`` as the fix), else
            ``None``.
    """

    def __init__(self, template: str, option: str, value: object = None) -> None:
        self.template = template
        self.option = option
        self.value = value
        super().__init__(self.render(lambda name, v: name if v is None else f"{name}={v!r}"))

    def render(self, spell: Callable[[str, object], str]) -> str:
        """The message with ``{option}`` replaced by ``spell(option, value)``."""
        return self.template.replace("{option}", spell(self.option, self.value))


def rank_error(exc: BaseException) -> BaseException | None:
    """The error a rank raised inside DCP's ``CheckpointException``, or ``None``.

    ``dcp.save``/``dcp.load`` wrap every rank's failure in ``CheckpointException`` (a
    ``BaseException``, which ``except Exception`` does not catch). This returns the lowest
    rank's torch_ucp error (:class:`CheckpointError`), else the lowest rank's other
    ``Exception``, so that callers of ``dcp`` directly can catch torch_ucp's types::

        try:
            dcp.load(state, storage_reader=UCPReader(url), planner=UCPLoadPlanner())
        except CheckpointException as e:
            error = torch_ucp.rank_error(e)
            if error is None:
                raise
            raise error from e
    """
    found: list[BaseException] = []

    def walk(e: BaseException, depth: int) -> None:
        failures = getattr(e, "failures", None)
        if not isinstance(failures, dict) or depth > 4:
            found.append(e)
            return
        for rank in sorted(failures):
            failure = failures[rank]
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                walk(inner, depth + 1)

    walk(exc, 0)
    for kind in (CheckpointError, Exception):
        for e in found:
            if e is not exc and isinstance(e, kind):
                return e
    return None
