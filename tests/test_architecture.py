"""The house's rules, checked by walking the package: every error a user can fix derives from the
one user-error type (which the CLI turns into one line and exit 2)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import esft_jax
from esft_jax.errors import UserError

# errors that are not the user's input: a run that diverged (exit 1), an HTTP reply's error (its
# status code), and two caught where they are raised (a decoding failure each reader turns into its
# own user error; a plan's compile that ran out of memory, reported as a row)
NOT_USER_ERRORS = {"DivergedError", "APIError", "NotUtf8", "OutOfMemory"}


def _modules():
    for info in pkgutil.walk_packages(esft_jax.__path__, "esft_jax."):
        yield importlib.import_module(info.name)


def test_every_error_the_package_defines_is_a_user_error():
    defined = {
        obj
        for module in _modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == module.__name__
    }
    assert len(defined) >= 10  # the walk found the package's errors
    wrong = sorted(
        f"{e.__module__}.{e.__name__}"
        for e in defined
        if e.__name__ not in NOT_USER_ERRORS and not issubclass(e, UserError)
    )
    assert not wrong, f"errors a user can fix must derive from esft_jax.errors.UserError: {wrong}"
