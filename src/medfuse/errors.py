"""Exceptions the CLI turns into one clear line (file + problem) and a non-zero exit code."""


class MedfuseError(Exception):
    """Base class of every error a user can cause (bad input, bad config, unreachable data)."""


class ConfigError(MedfuseError):
    """params.yaml or an overlay is invalid."""


class DataError(MedfuseError):
    """An input file is missing, corrupt, mis-sized or fails its checksum."""


class DownloadError(MedfuseError):
    """A file could not be fetched after all retries."""


class TrackingError(MedfuseError):
    """The MLflow tracking store or server cannot be opened, reached or written."""


class TrackingAuthError(TrackingError):
    """The MLflow server refused the credentials (HTTP 401) or the permission (HTTP 403)."""
