"""Secret values: kept in one file only its owner can read, never in git or the store.

The settings repo records only that a named secret changed (and when), so the
change has an author, a time and a diff, and makes a new revision; the value
lives here, in ``HOME/secrets.json`` (mode 0600), and reaches a service only
through its environment at start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from branchyard.auth import write_private

Slot = tuple[str, str]
MASK = "********"


class Vault:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._data: dict[str, dict[str, str]] = json.loads(path.read_text())
        except FileNotFoundError:
            self._data = {}

    @staticmethod
    def _key(slot: Slot) -> str:
        return f"{slot[0]}/{slot[1]}"

    def values(self, slot: Slot) -> dict[str, str]:
        return dict(self._data.get(self._key(slot), {}))

    def update(self, slot: Slot, changes: Mapping[str, str | None]) -> None:
        """Set (a string) or remove (None) secrets of a slot, and save.

        Memory changes only once the file is saved: a secret that could not be
        kept is not set.
        """
        key = self._key(slot)
        current = dict(self._data.get(key, {}))
        for name, value in changes.items():
            if value is None:
                current.pop(name, None)
            else:
                current[name] = value
        data = {k: v for k, v in self._data.items() if k != key}
        if current:
            data[key] = current
        write_private(self.path, json.dumps(data, indent=1, sort_keys=True))
        self._data = data


def masked(names: Mapping[str, str] | list[str] | tuple[str, ...]) -> dict[str, str]:
    return dict.fromkeys(names, MASK)
