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
