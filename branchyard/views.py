"""What the API and the dashboard read of one slot from the engine: a read-model snapshot.

The one place the read side gathers a slot's revisions, traffic, pin and branch
head; :mod:`branchyard.readmodel` works out what they mean.
"""

from __future__ import annotations

from branchyard.engine import Engine
from branchyard.planner import Slot
from branchyard.readmodel import Head, Snapshot
from branchyard.runtime import InstanceState


def snapshot(engine: Engine, slot: Slot) -> Snapshot:
    latest = next(iter(engine.store.revisions(slot, limit=1)), None)
    running = engine.rollouts.live(slot)
    head = engine.behind(slot)
    return Snapshot(
        latest=latest,
        live=engine.store.revision(running.revision.id) if running else None,
        restarting=running is not None and running.instance.state is not InstanceState.RUNNING,
        exit_code=running.instance.exit_code if running else None,
        restarts=running.instance.restarts if running else 0,
        weights=engine.rollouts.weights(slot),
        pinned=engine.store.pin(slot),
        behind=Head(head.branch, head.sha) if head else None,
    )
