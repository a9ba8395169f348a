"""User-facing errors.

Anything a user can cause (a bad config key, a corrupt checkpoint, a malformed dataset record) raises
:class:`LLMLabError` with a message that names the file, line or key. The CLI prints the message and exits
non-zero without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class LLMLabError(Exception):
    """An error caused by user input: printed as one clear line by the CLI."""


class ConfigError(LLMLabError):
    """Bad config: unknown key, wrong type, impossible shape."""


class CheckpointError(LLMLabError):
    """Missing, truncated or incompatible checkpoint."""


class DataError(LLMLabError):
    """Malformed dataset record, empty corpus, undecodable input."""
