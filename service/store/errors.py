"""Why the store refused something; the API layer maps each to a ModelsLab error response."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every refusal the store raises on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidApiKey(StoreError):
    """The key is unknown, revoked or expired (checked again inside the job's transaction)."""

    def __init__(self, message: str = "Invalid API key"):
        super().__init__(message)

    @classmethod
    def expired(cls, at) -> InvalidApiKey:
        """An expired key says when: only its holder can ask."""
        return cls(f"Invalid API key: it expired at {at:%Y-%m-%d %H:%M} UTC")


class InsufficientCredit(StoreError):
    """The balance or the free allowance cannot cover every image of the request."""


class ConcurrencyLimitExceeded(StoreError):
    """The key already has `limit` requests processing (HTTP 429 with retry_after)."""

    def __init__(self, limit: int):
        super().__init__(
            f"Too many requests in progress: at most {limit} at once for this key; "
            "retry when one has finished"
        )
        self.limit = limit


class KeyNotFound(StoreError):
    """No key has this name or id (admin commands)."""

    def __init__(self, name_or_id: str | int):
        super().__init__(f"No API key named or numbered {name_or_id!r}")
        self.name_or_id = name_or_id


class KeyNameTaken(StoreError):
    """Another key already has this name."""

    def __init__(self, name: str):
        super().__init__(f"An API key named {name!r} already exists")
        self.name = name


class IdempotencyKeyReused(StoreError):
    """The key's Idempotency-Key already names a job made from a different request."""

    def __init__(self) -> None:
        super().__init__(
            "Idempotency-Key was already used by this API key for a different request; "
            "use a new key for a new request"
        )


class DuplicateRequest(StoreError):
    """The request repeats one already accepted under its Idempotency-Key: `job` is that one's
    job, nothing new was created or charged."""

    def __init__(self, job) -> None:
        super().__init__(f"request already accepted as job {job.id}")
        self.job = job
