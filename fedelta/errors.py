"""The errors every layer raises: what the user asked for, and what a client sent.

Config, data, model, checkpoint, site and certificate errors all derive from
:class:`UserError` as well as from their natural built-in type, so the CLI prints
them as one line without importing (and paying for) every module that raises one.
"""


class UserError(Exception):
    """The input cannot work (a key, a file, a site); the message says what to change."""


class InvalidUpdateError(ValueError):
    """A received tensor record does not match what the server expects: the reply is
    rejected and counted, the round goes on."""
