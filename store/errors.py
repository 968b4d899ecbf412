"""The errors the store refuses with.

Apart from its records (`store/records.py`): evaluating a recipe needs only these, and a
client command starts faster without the records' dataclasses.
"""


class StoreError(Exception):
    """An operation the store refuses, with a message meant for the user."""


class InvalidReference(StoreError):
    """A path was added with a reference that is not valid in the store."""


class HashMismatch(StoreError):
    """Content did not have the hash it was declared to have."""


class NotValid(StoreError):
    """A query named a path that is not valid."""
