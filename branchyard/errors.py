"""The error tree of branchyard.

Every failure a user can cause or meet is one of these, with a message that fits
on one line and says what to do. Each entry point turns them into output in one
place: the CLI into a message and exit code 1, the API into a JSON body and an
HTTP status.

An error is *temporary* (it may pass by itself: a network that is down, a git
server that answers 503) or *permanent* (it stays until something changes: a
new commit, new settings, other input). Temporary errors are retried with
capped exponential backoff (:mod:`branchyard.retry`) and shown with when the
next try is; permanent ones are shown and never retried.

    BranchyardError                 base; .code is a stable machine-readable name
    │
    │ temporary (.temporary is True): retried with backoff
    ├── TemporaryError              may pass by itself (503)
    │   └── RemoteUnreachable       git could not reach a remote: network, DNS, a server's 5xx
    │
    │ permanent: until something changes
    ├── UsageError                  bad input from the user (400)
    │   └── InvalidSettings         an edited env document that does not validate
    ├── NotFound                    unknown repo, namespace or service (404)
    ├── Conflict                    e.g. a repo added twice (409)
    │   └── StaleVersion            settings changed since the version a change started from
    ├── DaemonNotRunning            the CLI cannot reach the daemon (503; start it)
    ├── GitError                    git refused: not a repository, a missing object (500)
    ├── ManifestError               a Procfile or branchyard.yaml that cannot be used (422)
    ├── BuildFailed                 a revision could not be fetched, built or started (500)
    │   ├── runtime.supervisor.FirstStartFailed   a new process ended before it was ready
    │   ├── runtime.kube.namespaces.NameTaken     a Kubernetes Namespace that is not ours
    │   └── runtime.kube.runtime.Stalled          a start crash-looping or past its deadline
    ├── HomeError                   the home cannot be written (read-only, full) (500)
    ├── webhooks.WebhookError       a webhook delivery refused (its own status and code)
    └── client.ApiError             an error the daemon answered, as the CLI meets it

The last three, and the three under ``BuildFailed``, live beside the code that raises
them. Not errors, and so not
here: ``router.request._Stop``, a signal that stops the HTTP parser in the
middle of the data it was fed and never leaves the router.

Anything else that escapes is a bug or a fault of the machine (a full or
read-only disk); where it must still end something with a reason (a deploy),
:func:`reason_of` says it on one line. Of those, only a ``ConnectionError`` or
a ``TimeoutError`` is temporary (:func:`is_temporary`).
"""

from __future__ import annotations


class BranchyardError(Exception):
    code = "error"
    status = 500
    temporary = False  # True: it may pass by itself, and is retried

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TemporaryError(BranchyardError):
    code = "temporary"
    status = 503
    temporary = True


class RemoteUnreachable(TemporaryError):
    code = "remote_unreachable"


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


class GitError(BranchyardError):
    code = "git_error"
    status = 500


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


def is_temporary(exc: BaseException) -> bool:
    """Whether ``exc`` may pass by itself: one of ours that says so, or a connection
    that failed or timed out in code outside the tree."""
    if isinstance(exc, BranchyardError):
        return exc.temporary
    return isinstance(exc, (ConnectionError, TimeoutError))
