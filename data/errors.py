"""The one error type of the data package, in its own module so `sources` and `folder` can both
raise it without importing each other."""
from __future__ import annotations


class DataSourceError(ValueError):
    """A data spec, option or image folder cannot be turned into a dataset; the message names
    the spec or path and what was expected."""
