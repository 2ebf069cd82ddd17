"""The base of every error this package raises for a user's mistake (config, data, checkpoint)."""


class MultiHashError(Exception):
    """A problem with what the user gave (a config, input data, a checkpoint or a mapping); the
    message names the table, feature, file or key. Catch this to handle any of them."""


class InvalidInputError(MultiHashError, ValueError):
    """An input KJT that the module cannot look up; the message names feature, table and id."""
