"""The error tree of branchyard.

Every failure a user can cause or meet is one of these, with a message that fits
on one line and says what to do. Each entry point turns them into output in one
place: the CLI into a message and exit code 1, the API into a JSON body and an
HTTP status.

    BranchyardError                 base; .code is a stable machine-readable name
    ├── UsageError                  bad input from the user (400)
    │   └── InvalidSettings         an edited env document that does not validate
    ├── NotFound                    unknown repo, namespace or service (404)
    ├── Conflict                    e.g. a repo added twice (409)
    │   └── StaleVersion            settings changed since the version a change started from
    ├── DaemonNotRunning            the CLI cannot reach the daemon
    ├── ManifestError               a Procfile or branchyard.yaml that cannot be used
    ├── BuildFailed                 a revision could not be fetched, built or started
    └── HomeError                   the home cannot be written (read-only, full) (500)

Anything else that escapes is a bug or a fault of the machine (a full or
read-only disk); where it must still end something with a reason (a deploy),
:func:`reason_of` says it on one line.
"""

from __future__ import annotations


class BranchyardError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(BranchyardError):
    code = "bad_request"
    status = 400


class InvalidSettings(UsageError):
    code = "invalid_settings"


class NotFound(BranchyardError):
    code = "not_found"
    status = 404


class Conflict(BranchyardError):
    code = "conflict"
    status = 409


class StaleVersion(Conflict):
    code = "stale_version"


class DaemonNotRunning(BranchyardError):
    code = "daemon_not_running"
    status = 503


class ManifestError(BranchyardError):
    code = "bad_manifest"
    status = 422


class BuildFailed(BranchyardError):
    code = "build_failed"
    status = 500


class HomeError(BranchyardError):
    code = "home_error"
    status = 500


MAX_REASON = 300  # characters of a reason kept (a revision's WHY column, an event)


def reason_of(exc: BaseException) -> str:
    """``exc`` as a one-line reason: our own message, or the type and text of any other."""
    text = exc.message if isinstance(exc, BranchyardError) else f"{type(exc).__name__}: {exc}"
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"
