"""Exception types raised by kmeans-dask.

Every error the project raises on purpose derives from :class:`KMeansDaskError`,
so job scripts can turn them into a one-line message and a non-zero exit
while real bugs still show a traceback.
"""


class KMeansDaskError(Exception):
    """Base class of every error kmeans-dask raises deliberately."""


class IDXFormatError(KMeansDaskError, ValueError):
    """An IDX file (or its gzip wrapper) is malformed, truncated or not what was expected."""


class ChecksumError(KMeansDaskError, ValueError):
    """A file's bytes do not match the published checksum."""


class SourceError(KMeansDaskError, FileNotFoundError):
    """A data set's files could not be found or downloaded."""


class StoreError(KMeansDaskError, ValueError):
    """A Zarr store is missing, incomplete or does not match the expected schema."""


class ConfigError(KMeansDaskError, ValueError):
    """A configuration file or option is malformed."""


class ClusterError(KMeansDaskError, RuntimeError):
    """The Dask cluster could not be reached or was lost."""


class ImageError(KMeansDaskError, ValueError):
    """An image file is missing, not an image, or damaged."""
