"""User mistakes on the command line: one line on stderr, exit status 1, no traceback.

``python -m sgt_jax.main`` runs every mode through ``run_cli``. An exception of a ``USER_ERRORS`` type (a
wrong flag or config value, a missing or malformed file) is printed as ``error: <message>`` (the message
names the file or field and what is wrong) and the process exits with status 1. Any other exception, and
a ValueError raised inside a library, is a bug in sgt_jax and keeps its full traceback. ``--debug`` (or ``SGT_DEBUG=1``) shows the traceback of user
errors too. The table of inputs, messages and exit statuses: docs/errors.md.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags

EXIT_USER_ERROR = 1
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of an input error (also SGT_DEBUG=1); "
                           "without it an input error prints one line and exits with status 1.")


class InputError(ValueError):
    """A user's input (flag, config value, file) is wrong; the message says which and how."""


# ValueError: wrong values (our checks and config files raise it with a message naming the field); the
# OSErrors: paths. A ValueError raised inside a third-party package (jax, orbax, ...) is not ours to word:
# it is treated as a bug and keeps its traceback (``raised_by_a_library``).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def raised_by_a_library(err: BaseException) -> bool:
    """True if ``err`` was raised in an installed package (site-packages), not by sgt_jax or a config file."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if path.startswith(_PACKAGE_DIR):  # sgt_jax itself, also when installed into site-packages
        return False
    return any(part in ("site-packages", "dist-packages") for part in path.split(os.sep))


def debug_requested() -> bool:
    if os.environ.get("SGT_DEBUG", "") not in ("", "0"):
        return True
    if flags.FLAGS.is_parsed():
        return bool(_DEBUG.value)
    return "--debug" in sys.argv[1:]  # the error happened while parsing flags


MAX_LISTED = 5


def message(err: BaseException) -> str:
    """The user-facing text of ``err`` on one line: its message (OSErrors: the path and the reason); a
    message that lists problems on further lines is joined with "; ", the first MAX_LISTED of them."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    lines = [ln.strip() for ln in (str(err) or type(err).__name__).splitlines() if ln.strip()]
    more = len(lines) - 1 - MAX_LISTED
    return " ".join([lines[0], "; ".join(lines[1:1 + MAX_LISTED])] if len(lines) > 1 else lines) + (
        f"; and {more} more (--debug shows all)" if more > 0 else "")


def unknown_config_field(err: BaseException, argv: list[str]) -> str | None:
    """A readable line for the AttributeError/KeyError ml_collections raises on ``--config.a.nope=...``."""
    name = str(err.args[0] if err.args else err).strip("\"'")
    for arg in argv:
        if arg.startswith("--config.") and name in arg.split("=", 1)[0][len("--config."):].split("."):
            return (f"{arg.split('=', 1)[0]}: the config has no field {name!r} (--print_config lists every "
                    f"field of the config)")
    return None


def run_cli(fn: Callable[[], object], argv: list[str] | None = None) -> None:
    """Runs ``fn`` (absl's ``app.run(main)``); turns user errors into one line + exit status 1."""
    argv = sys.argv if argv is None else argv
    try:
        fn()
    except USER_ERRORS as err:
        if debug_requested() or (isinstance(err, ValueError) and raised_by_a_library(err)):
            raise
        print(f"error: {message(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (AttributeError, KeyError) as err:
        line = None if flags.FLAGS.is_parsed() else unknown_config_field(err, argv)
        if line is None or debug_requested():
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
