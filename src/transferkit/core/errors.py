"""The one base of transferkit's expected errors.

Every stage raises a subclass of `TransferkitError` for input it refuses (a bad folder, params field, model
name, version, ...), with a message that names the file or field. The CLI turns these (and OSError) into
one line and a non-zero exit; anything else is a bug and keeps its traceback.

The stage errors also derive from ValueError where they always have: callers catch them as such.
"""

from __future__ import annotations


class TransferkitError(Exception):
    """An expected, readable failure: bad input or a refused operation; the message names what is wrong."""


class InputError(TransferkitError, ValueError):
    """A file or value that belongs to no single stage and is not what it must be (e.g. malformed JSON)."""


class Busy(TransferkitError):
    """Another process holds what this one needs (a DVC workspace): nothing was done, try again later."""


# Exit codes of the CLI and of `python -m transferkit.flows...`, in one table. A refused gate is not an error: it is a
# completed run whose verdict is "no"; scripts still see it as EXIT_REFUSED.
EXIT_ERROR = 1  # bad input or a refused operation (a TransferkitError), a missing or unreadable file (OSError)
EXIT_REFUSED = 3  # the validation gate refused the model: nothing exported
EXIT_BUSY = 75  # EX_TEMPFAIL (sysexits.h): nothing was written, try again later
EXIT_CODES: dict[type[BaseException], int] = {Busy: EXIT_BUSY, TransferkitError: EXIT_ERROR, OSError: EXIT_ERROR}


def exit_code(error: BaseException) -> int | None:
    """The exit code of an expected error (`EXIT_CODES`, most specific type first); None for a bug."""
    return next((EXIT_CODES[t] for t in type(error).__mro__ if t in EXIT_CODES), None)
