"""Errors in the user's data, configuration or weights, and how the command lines show them.

Every error a user can fix (a dataset folder of the wrong layout, a corrupt image, a weights file that does not
fit, an option value that cannot work) derives from :class:`AdfaInputError`. Its message names the file or
option, the problem and the fix, so the command lines print that message alone, without the traceback:
``anomalib-adfa`` catches these errors in ``main``; the ``anomalib`` command line gets :func:`install_cli_excepthook`
from the start-up hook (:mod:`anomalib_adfa_autoload`) right after anomalib's CLI module has set up its own
exception display. Everything else, real bugs included, keeps its full traceback.

jsonargparse, which builds the ``--model`` and ``--data`` objects of anomalib's CLI, reports an error raised while
constructing a class as text inside its own ``ValueError`` (not as its cause), so the hook also recognises the
message of the last :class:`AdfaInputError` created in the process inside such an error.

This module imports nothing heavy: the start-up hook may load it in any process that runs anomalib's CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import TracebackType

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


class AdfaInputError(Exception):
    """A problem with the user's data, configuration or weights, with the fix in its message."""

    last: AdfaInputError | None = None
    """The most recently created instance (see the module docstring)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        AdfaInputError.last = self


class BackboneWeightsError(AdfaInputError, ValueError):
    """The backbone's weights cannot be loaded: a missing or unfitting file, or no hub and no file."""


class ConfigurationError(AdfaInputError, ValueError):
    """An option value that cannot work (the message names the option and a value that does)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_error(error: BaseException) -> AdfaInputError | None:
    """Return the :class:`AdfaInputError` behind ``error``, if there is one.

    Args:
        error: The exception that ended the program.

    Returns:
        The first :class:`AdfaInputError` in ``error``'s chain of causes; else the last one created, if ``error``'s
        message quotes it (jsonargparse's way of reporting a failed construction); else ``None``.
    """
    for link in _chain(error):
        if isinstance(link, AdfaInputError):
            return link
    last = AdfaInputError.last
    if last is not None and str(last) and _words(str(last)) in _words(str(error)):
        return last
    return None


def _words(text: str) -> str:
    # jsonargparse indents the quoted message's lines; compare the words only.
    return " ".join(text.split())


def format_user_error(error: AdfaInputError) -> str:
    """One block of text for the terminal: the error's kind and message."""
    return f"error ({type(error).__name__}): {error}"


def install_cli_excepthook() -> None:
    """Print :class:`AdfaInputError` s (also inside another library's error) as their message alone.

    Wraps the current ``sys.excepthook`` (anomalib's CLI installs rich's); other exceptions go to it unchanged.
    Idempotent.
    """
    previous = sys.excepthook
    if getattr(previous, "_adfa_short_errors", False):
        return

    def short_user_errors(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        found = user_error(error)
        if found is None:
            previous(kind, error, trace)
        else:
            print(format_user_error(found), file=sys.stderr)

    short_user_errors._adfa_short_errors = True  # type: ignore[attr-defined]
    sys.excepthook = short_user_errors
