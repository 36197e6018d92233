"""Error types. Every error caused by the user's input derives from :class:`InputError`.

``InputError`` is also a ``ValueError`` so that ``except ValueError`` in user code keeps working;
the CLI turns it into a one-line message and exit status 2.
"""

from __future__ import annotations


class MergelabError(Exception):
    """Base class of mergelab's own errors."""


class InputError(MergelabError, ValueError):
    """Bad input: a file, key, field or parameter that is not what was expected."""


class ParameterError(InputError):
    """A method parameter whose value the method refuses. ``parameter`` names it (``scaling[a]``: task
    ``a``'s entry of a per-task ``scaling``), so a config check can point at the field without parsing
    the message."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class IncompatibleModelsError(InputError):
    """The pretrained model and an expert cannot be merged (keys, shapes or values differ)."""


class HubUnavailableError(InputError):
    """A hub id was given but the hub cannot be reached (offline)."""
