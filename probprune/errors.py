"""Errors that mean "the user asked for something that cannot work" (CLI exit code 2)."""

from __future__ import annotations


class ProbPruneError(Exception):
    """Base class of every error probprune raises on purpose."""


class UserError(ProbPruneError):
    """Bad input: a path, a value, a config key or an environment the user controls.

    The message names the field and the value; the CLI prints it on one line and exits with code 2.
    """


class ConfigError(UserError):
    """One or more config fields are invalid. ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            msg = f"invalid config: {self.errors[0]}"
        else:
            msg = "invalid config, found the following errors:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(msg)


class UnsupportedModelError(UserError):
    """The model's architecture has no adapter."""
