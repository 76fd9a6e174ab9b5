"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
import argparse
import functools
import sys
from typing import Callable, List

# What a @cli main gives back when it ends, however it ends (run-directory locks: util.rundir).
_AT_END: List[Callable[[], None]] = []


class UserError(Exception):
    """Bad input from the user (flag, config, data path, checkpoint). Exit code 2."""


def at_end(fn: Callable[[], None]) -> None:
    """Call `fn` when the running @cli main returns, fails or exits (in-process runs included,
    where atexit would wait for the interpreter)."""
    _AT_END.append(fn)


def cli(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a script's main so a UserError ends the process with one line and exit 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)
        finally:
            while _AT_END:
                _AT_END.pop()()
    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse for a @cli main: a bad argument is a UserError (one line, exit 2), without
    argparse's usage block."""
    def error(self, message: str) -> None:
        raise UserError(message)
