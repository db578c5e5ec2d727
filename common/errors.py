"""Quarry's exception tree.

QuarryError
├── UserError            the request is refused as a whole (CLI exit code 2)
│   ├── ConfigError      a setting is missing or malformed
│   ├── QueryError       the selection query is refused
│   ├── SpecError        the augmentation spec is refused
│   ├── ModelError       the model file or its metadata is refused
│   └── NoSuchJob        a command names a job that does not exist
├── JobFailed            a job's selection failed halfway through recording (CLI exit code 1)
├── TransientError       worth retrying: a service did not answer
│   ├── StorageUnavailable
│   ├── DatabaseUnavailable
│   │   └── LockConflict a deadlock or lock timeout that retries did not clear
│   └── BrokerUnavailable
├── PermanentError       one item is bad: record it and move on
│   ├── ImageMissing     no image stored for the id
│   ├── ImageDecodeError the bytes are not a readable image
│   │   └── ImageTooLarge    past IMAGE_MAX_PIXELS or IMAGE_MAX_BYTES: refused unread or undecoded
│   ├── SourceRefused    its bucket is not one images may be read from (SOURCE_BUCKETS)
│   └── ObjectMissing    no object at that S3 key
└── StorageError         S3 refused for a reason a retry won't fix (credentials, bucket)
"""

from __future__ import annotations


class QuarryError(Exception):
    """Base of every error Quarry raises on purpose."""


class UserError(QuarryError):
    """The whole request is refused; the message is shown as one line."""


class ConfigError(UserError):
    """A setting is missing or malformed."""


class QueryError(UserError):
    """The selection query is refused (writes, fails, or has no id column)."""


class SpecError(UserError):
    """The augmentation spec is refused."""


class ModelError(UserError):
    """The model file or its metadata is refused."""


class NoSuchJob(UserError):
    """A command or API call names a job id that is not in the database."""


class JobFailed(QuarryError):
    """A job's selection could not be recorded whole (its query failed halfway); the job is failed."""


class UnknownJob(QuarryError):
    """A task names a job that is not in the worker's database (DATABASE_URL differs?)."""


class TransientError(QuarryError):
    """A service did not answer; the task is retried with backoff."""


class StorageUnavailable(TransientError):
    """The S3 endpoint did not answer or asked us to slow down."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL did not answer."""


class LockConflict(DatabaseUnavailable):
    """PostgreSQL kept refusing a transaction for lock conflicts (deadlock, lock timeout)."""


class BrokerUnavailable(TransientError):
    """The Redis broker did not take a message."""


class PermanentError(QuarryError):
    """One item cannot be processed; it is recorded as failed and the chunk goes on."""


class ImageMissing(PermanentError):
    """The catalog has no stored image for this id."""


class ImageDecodeError(PermanentError):
    """The bytes are not a readable image."""


class ImageTooLarge(ImageDecodeError):
    """An image past IMAGE_MAX_PIXELS or IMAGE_MAX_BYTES, refused before it is decoded or read."""


class SourceRefused(PermanentError):
    """An image's bucket is not one Quarry may read sources from (SOURCE_BUCKETS)."""


class ObjectMissing(PermanentError):
    """No object at that S3 key."""


class SourceChanged(PermanentError):
    """An image's source object has other bytes than when it was registered (another ETag)."""


class StorageError(QuarryError):
    """S3 refused a request for a reason retrying will not fix (credentials, bucket name)."""


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (TransientError,)
