"""The one exception hierarchy. The CLI maps ``exit_code``, the service maps ``http_status``."""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class: the message says what was wrong and what to do."""

    exit_code = 1
    http_status = 500


class UsageError(FeatcacheError):
    """Wrong flags or arguments."""

    exit_code = 2
    http_status = 400


class NotFoundError(FeatcacheError):
    """A file, cache, fingerprint, key or backbone that does not exist."""

    exit_code = 3
    http_status = 404


class WeightsError(FeatcacheError):
    """Weights missing, unreadable, or with the wrong sha256."""

    exit_code = 4
    http_status = 500


class FingerprintMismatch(FeatcacheError):
    """Vectors, heads or indexes of different fingerprints were about to be mixed."""

    exit_code = 5
    http_status = 409


class CacheError(FeatcacheError):
    """The cache on disk is not a featcache cache or is inconsistent."""

    exit_code = 6
    http_status = 500


class ImageError(FeatcacheError):
    """An image could not be decoded (corrupt, truncated, not an image, too large)."""

    exit_code = 7
    http_status = 422


class UnsupportedMedia(ImageError):
    """The bytes are not an image format featcache decodes."""

    http_status = 415


class TooLarge(ImageError):
    """Upload or pixel count above the configured limit."""

    http_status = 413
