"""The kind of error that means: what the recipe names cannot be used as given.

The command line sorts the errors a user can fix by whose move it is: an invalid recipe, or a
file, folder, model or revision it names that is missing or unreadable, exits with status 2
before anything is trained; a run that started and stopped (:class:`RunError`) exits with
status 1. Modules
raise a subclass of :class:`InputError` (with their own error class as a second base, so
existing ``except`` clauses still catch it) for the first kind.
"""

from __future__ import annotations

__all__ = ["InputError", "RunError"]


class InputError(Exception):
    """Something the recipe names cannot be used as given: a data file or folder, a model, a revision.

    The message names the input, says what is wrong with it and what to do. Nothing has been
    trained when it is raised.
    """


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do (exit status 1)."""
