"""What the server's domain refuses, in domain terms and free of HTTP.

Domain modules (repository, publishing, waves, root updates, credentials, blobs) raise
these; `tufa.server.errors` maps each class to a status code, and the API layer turns
them into the JSON error body every client reads. The `code` is what scripts match on,
so it is part of the API and must not change.
"""

from __future__ import annotations

from typing import ClassVar


class Refused(Exception):
    """A request the server will not carry out; the message names the problem and the fix."""

    code: ClassVar[str] = "refused"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(Refused):
    """The request itself is wrong: a field, a file or a signature the caller sent."""

    code = "bad_request"


class RuleViolated(InvalidInput):
    """A staged change breaks a rule of the trust model (core/root_update.py)."""

    code = "rule_violated"


class NotSigned(InvalidInput):
    """A change that needs more signatures by offline keys before it can take effect."""

    code = "not_signed"


class NotFound(Refused):
    code = "not_found"


class Conflict(Refused):
    """The request is well formed, but the state it would act on does not allow it."""

    code = "conflict"


class TargetsTooLarge(Conflict):
    """Publishing would make a targets file larger than every device accepts."""

    code = "targets_too_large"


class ArchiveGone(Refused):
    """The one-time offline keys archive was downloaded and deleted: no copy is left."""

    code = "archive_gone"


class TooLarge(Refused):
    """An upload larger than the server stores."""

    code = "too_large"


class NotAuthenticated(Refused):
    """The secret a caller sent is no valid credential: unknown, expired or revoked."""

    code = "unauthorized"


class CredentialRevoked(NotAuthenticated):
    """A device credential that worked once and never will again; its own code, so an
    agent can tell it from a typo'd or unknown credential."""

    code = "credential_revoked"
