"""The vault keeps a secret only once it is on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchyard.vault import Vault

SLOT = ("main", "app")


def test_a_secret_is_saved_and_read_back_by_the_next_daemon(tmp_path: Path) -> None:
    Vault(tmp_path / "secrets.json").update(SLOT, {"TOKEN": "s3cret"})
    assert Vault(tmp_path / "secrets.json").values(SLOT) == {"TOKEN": "s3cret"}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"NEW": "x"}, id="set"),
        pytest.param({"TOKEN": "changed"}, id="change"),
        pytest.param({"TOKEN": None}, id="unset"),
    ],
)
def test_a_secret_that_cannot_be_saved_is_not_set_in_memory_either(
    tmp_path: Path, changes: dict[str, str | None]
) -> None:
    vault = Vault(tmp_path / "secrets.json")
    vault.update(SLOT, {"TOKEN": "old"})
    (tmp_path / ".secrets.json.tmp").mkdir()  # where the save writes first: it cannot
    with pytest.raises(OSError):
        vault.update(SLOT, changes)
    assert vault.values(SLOT) == {"TOKEN": "old"}
    assert Vault(tmp_path / "secrets.json").values(SLOT) == {"TOKEN": "old"}
