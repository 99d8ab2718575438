"""The error tree: which failures are temporary, and that every error class is in the tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import branchyard
from branchyard import errors
from branchyard.errors import (
    BranchyardError,
    BuildFailed,
    GitError,
    HomeError,
    ManifestError,
    RemoteUnreachable,
    TemporaryError,
    UsageError,
    is_temporary,
)
from branchyard.git import failure_of
from branchyard.runtime.supervisor import FirstStartFailed
from branchyard.webhooks import WebhookError

HTTP_REPO = "'http://git.example.com/app.git/'"


@pytest.mark.parametrize(
    ("stderr", "temporary"),
    [
        # the network or the server failed: temporary
        (
            f"fatal: unable to access {HTTP_REPO}: Failed to connect to 127.0.0.1 port 9 "
            "after 0 ms: Couldn't connect to server",
            True,
        ),
        (f"fatal: unable to access {HTTP_REPO}: Could not resolve host: git.example.com", True),
        (f"fatal: unable to access {HTTP_REPO}: The requested URL returned error: 503", True),
        (f"fatal: unable to access {HTTP_REPO}: The requested URL returned error: 502", True),
        (f"fatal: unable to access {HTTP_REPO}: The requested URL returned error: 429", True),
        (
            "error: RPC failed; HTTP 503 curl 22 The requested URL returned error: 503\n"
            "fatal: expected flush after ref listing",
            True,
        ),
        (f"fatal: unable to access {HTTP_REPO}: Connection timed out after 300001 ms", True),
        (f"fatal: unable to access {HTTP_REPO}: Operation timed out after 30000 ms", True),
        (
            "fatal: unable to connect to 127.0.0.1:\n"
            "127.0.0.1[0: 127.0.0.1]: errno=Connection refused",
            True,
        ),
        (
            "fatal: unable to look up git.example.com (port 9418) "
            "(Temporary failure in name resolution)",
            True,
        ),
        (
            "ssh: connect to host 127.0.0.1 port 22: Connection refused\n"
            "fatal: Could not read from remote repository.",
            True,
        ),
        (
            "ssh: Could not resolve hostname git.example.com: Name or service not known\n"
            "fatal: Could not read from remote repository.",
            True,
        ),
        ("ssh: connect to host 10.0.0.1 port 22: No route to host", True),
        ("ssh: connect to host 10.0.0.1 port 22: Network is unreachable", True),
        ("fatal: read error: Connection reset by peer", True),
        ("fatal: the remote end hung up unexpectedly\nfatal: early EOF", True),
        # the request is wrong, or the repo is: permanent
        (
            "fatal: '/tmp' does not appear to be a git repository\n"
            "fatal: Could not read from remote repository.",
            False,
        ),
        (f"fatal: repository {HTTP_REPO} not found", False),
        (f"fatal: unable to access {HTTP_REPO}: The requested URL returned error: 404", False),
        (f"fatal: unable to access {HTTP_REPO}: The requested URL returned error: 403", False),
        (
            "fatal: could not read Username for 'https://git.example.com': "
            "terminal prompts disabled",
            False,
        ),
        (
            "git@git.example.com: Permission denied (publickey).\n"
            "fatal: Could not read from remote repository.",
            False,
        ),
        (
            f"fatal: unable to access {HTTP_REPO}: SSL certificate problem: "
            "unable to get local issuer certificate",
            False,
        ),
        ("fatal: remote error: access denied or repository not exported: /app.git", False),
        ("fatal: bad object 3f2c1ab", False),
        ("", False),
    ],
)
def test_a_git_failure_is_temporary_only_when_the_network_or_server_failed(
    stderr: str, temporary: bool
) -> None:
    error = failure_of(stderr, "fetch")
    assert type(error) is (RemoteUnreachable if temporary else GitError)
    assert is_temporary(error) is temporary
    assert error.message == (stderr.splitlines()[0] if stderr else "git fetch failed")


@pytest.mark.parametrize(
    ("error", "temporary", "status"),
    [
        (RemoteUnreachable("fatal: unable to access"), True, 503),
        (TemporaryError("the server is busy"), True, 503),
        (GitError("fatal: bad object"), False, 500),
        (UsageError("bad input"), False, 400),
        (ManifestError("no web process"), False, 422),
        (BuildFailed("build step `make` exited 2"), False, 500),
        (FirstStartFailed("exited with code 1 before it was ready", 1), False, 500),
        (HomeError("Read-only file system"), False, 500),
        (WebhookError(401, "bad_webhook_signature", "wrong signature"), False, 401),
        (ConnectionRefusedError(111, "Connection refused"), True, None),
        (ConnectionResetError(104, "Connection reset by peer"), True, None),
        (TimeoutError(), True, None),
        (FileNotFoundError(2, "No such file or directory"), False, None),
        (OSError(28, "No space left on device"), False, None),
        (ValueError("a bug"), False, None),
    ],
)
def test_which_errors_are_temporary(error: Exception, temporary: bool, status: int | None) -> None:
    assert is_temporary(error) is temporary
    if status is not None:
        assert isinstance(error, BranchyardError) and error.status == status


def error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in the package, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for module in pkgutil.walk_packages(branchyard.__path__, "branchyard."):
        if module.name.endswith("__main__"):
            continue  # runs the CLI
        loaded = importlib.import_module(module.name)
        for _, value in inspect.getmembers(loaded, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.name:
                found[f"{module.name}.{value.__qualname__}"] = value
    return found


def test_every_error_class_of_the_package_is_in_the_tree_and_drawn_in_its_docstring() -> None:
    classes = error_classes()
    assert "branchyard.git.GitError" not in classes  # it moved into the tree's module
    signals = {"branchyard.router.request._Stop"}  # stops a parser; never leaves the router
    assert signals <= classes.keys()
    drawing = errors.__doc__ or ""
    for name, cls in classes.items():
        if name in signals:
            assert name.removeprefix("branchyard.") in drawing  # named as not an error
            continue
        assert issubclass(cls, BranchyardError), f"{name} is outside the error tree"
        assert cls.__name__ in drawing, f"{name} is not drawn in errors.py's docstring"
