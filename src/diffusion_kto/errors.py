"""Errors that mean a user's mistake: the CLI prints them as one line naming the key, file, row or judge, never as a
traceback. Every layer raises these (or subclasses); nothing here imports anything of ours."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave (config, data, paths, judges): the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""
