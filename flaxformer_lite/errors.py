"""Errors the user can fix, and how the command-line programs report them: one line, exit status 2.

Each class also derives from the built-in error it refines (``ValueError``, ``FileNotFoundError``), so code
that catches those keeps working. Anything else that escapes a program is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Callable

USAGE_EXIT_STATUS = 2  # As absl's app.UsageError and a bad flag value.


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value or flag is invalid; the message names it (``config.train.learning_rate ...``)."""


class NotFoundError(UserError, FileNotFoundError):
    """A path, run, split or checkpoint the user named does not exist."""


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)``, with every user error reported as one line ``error: MESSAGE`` on stderr and
    exit status 2 instead of a traceback or absl's usage text: a flag that does not parse (``--config.*``
    overrides included), ``app.UsageError``, and any :class:`UserError` raised by ``main``.

    ``--verbosity=1`` (absl's own flag) re-raises those from ``main``, traceback included.
    """
    from absl import app

    app.run(_report_user_errors(main), flags_parser=_parse_flags)


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(str(error))
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # ml_collections' --config.* overrides.
        message = str(error)
        if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
            message = ast.literal_eval(message)  # KeyError and AttributeError quote their text.
        overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
        _fail(f"{' '.join(overrides) or 'a flag'}: {message}")


def _report_user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    from absl import app, logging

    @functools.wraps(main)
    def run_main(argv: list[str]) -> None:
        try:
            main(argv)
        except (UserError, app.UsageError) as error:
            if logging.get_verbosity() >= logging.DEBUG:
                raise
            _fail(str(error))

    return run_main
