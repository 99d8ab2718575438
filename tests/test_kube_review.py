"""Which addresses ``k8s render`` warns of: those a pod reaches only itself at (pure)."""

from __future__ import annotations

import pytest

from branchyard.runtime.kube.review import loopback


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:44885", True),
        ("http://127.9.9.9/x", True),
        ("http://[::1]:80/", True),
        ("http://0.0.0.0:8000", True),
        ("http://localhost:6379", True),
        ("http://web.main.localhost:7080/", True),
        ("postgresql://u:p@127.0.0.1:5432/db", True),
        ("http://app", False),
        ("http://10.0.0.7:8080", False),
        ("https://git.example.com/team/app.git", False),
        ("git@127.0.0.1:team/app.git", False),  # no scheme: not a URL this reads
        ("127.0.0.1", False),
        ("http://[::1", False),  # not a URL at all
        ("fast", False),
    ],
)  # fmt: skip
def test_an_address_is_loopback_when_a_pod_would_reach_only_itself_there(
    url: str, expected: bool
) -> None:
    assert loopback(url) is expected
