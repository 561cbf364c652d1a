"""Errors the library raises. The CLI turns each into one stderr line and its exit code.

Exit codes (the CLI contract):
  0  success
  1  verification failed: the deploy model does not compute the training model's function
  2  bad input or usage: unreadable/unsafe file, wrong architecture, key or shape mismatch,
     non-finite weights, negative BN variance, unwritable or existing output
Anything else (a traceback) is a bug in repfuse.
"""

from __future__ import annotations

from typing import Any


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), at most ``limit`` chars."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


class RepfuseError(Exception):
    """Base class: a problem with the user's input. Its message is one line naming the culprit."""

    exit_code = 2


class BadInput(RepfuseError):
    """The file, key or option given cannot be used."""


class UnsafeCheckpoint(RepfuseError):
    """The checkpoint needs code to be unpickled and the user did not allow it."""


class KeyMismatch(RepfuseError):
    """The weights do not match the architecture (missing, unexpected or mis-shaped keys)."""


class UnknownArch(RepfuseError):
    """No registered fuser has this name, or none recognizes the checkpoint."""


class OutputError(RepfuseError):
    """The output path exists (without --force), is the input, or cannot be written."""


class AnnealingUnfinished(RepfuseError):
    """A VanillaNet checkpoint whose deep-training annealing had not finished."""


class VerifyFailed(RepfuseError):
    """The deploy model's outputs differ from the training model's beyond tolerance."""

    exit_code = 1

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result
