"""What the cluster says of a revision, in branchyard's words: pure functions over
Deployment and Pod objects, no API server.

- :func:`progress`: whether a Deployment just applied is Available yet, still on its
  way, stalled (its ``progressDeadlineSeconds`` passed), or crashing (its newest pod in
  a crash loop: failed at once, as a first start that exits fails locally);
- :func:`instance_state`: the ``InstanceState`` ``ps`` shows, the restarts and the last
  exit code of a revision's web container, from its pods;
- :func:`failure`: why a revision is not Available, in one line, from its pods (a
  waiting reason such as ``ImagePullBackOff`` or ``CrashLoopBackOff``, an init
  container that failed, a pod never made or never scheduled, or "not ready").

docs/kubernetes.md has the mapping as a table.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from lightkube.models.core_v1 import ContainerStatus
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from branchyard.runtime import InstanceState

MESSAGE_ROOM = 160
"""Characters of a message from the cluster kept in a reason (they can be long)."""

BACKING_OFF = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError"}
)
"""Waiting reasons of a container the kubelet tries again after a pause."""
PULLING = frozenset({"ImagePullBackOff", "ErrImagePull"})
"""Waiting reasons of an image that cannot be pulled: the message names the image, which is
what to fix, whichever container (an ``image:`` is the ``install`` init container's too)."""


class Progress(enum.Enum):
    PROGRESSING = "progressing"
    AVAILABLE = "available"
    STALLED = "stalled"  # its progress deadline passed
    CRASHING = "crashing"  # a container of its newest pod exited, and the kubelet backs off


@dataclass(frozen=True)
class Seen:
    """A revision's web process as ``ps`` shows it."""

    state: InstanceState
    restarts: int = 0
    exit_code: int | None = None


def _condition(deployment: Deployment, kind: str) -> tuple[str, str, str] | None:
    """(status, reason, message) of the Deployment's condition ``kind``."""
    status = deployment.status
    for found in (status.conditions if status else None) or ():
        if found.type == kind:
            return found.status or "", found.reason or "", found.message or ""
    return None


def progress(
    deployment: Deployment | None, generation: int, replicas: int = 1, pods: Sequence[Pod] = ()
) -> Progress:
    """Where a Deployment applied at ``generation`` is: the controller has seen that
    generation and it is Available with ``replicas`` pods of it ready and no pod of an
    older template left (a restart's old pod keeps it Available while the new one is not
    Ready), and ``pods`` (the revision's, as the pod watch holds them) have as many Ready
    ones of its template (the Deployment's watch may tell of them before the pods' does:
    the instance's state is read from the pods); it stalled; or the newest of ``pods``
    made from its template as it is now is in a crash loop (:func:`crash_looping`), which
    fails it long before its deadline."""
    if deployment is None or deployment.status is None or deployment.metadata is None:
        return Progress.PROGRESSING
    status = deployment.status
    if (status.observedGeneration or 0) < generation:
        return Progress.PROGRESSING
    stalled = _condition(deployment, "Progressing")
    if stalled is not None and stalled[:2] == ("False", "ProgressDeadlineExceeded"):
        return Progress.STALLED
    if crash_looping(_of_template(deployment, pods)):
        return Progress.CRASHING
    available = _condition(deployment, "Available")
    updated = status.updatedReplicas or 0
    if (
        available is not None
        and available[0] == "True"
        and updated >= replicas
        and (status.availableReplicas or 0) >= replicas
        and (status.replicas or 0) <= updated  # an older template's pod counts as available
        and sum(map(_ready, _live(_of_template(deployment, pods)))) >= replicas
    ):
        return Progress.AVAILABLE
    return Progress.PROGRESSING


def crash_looping(pods: Sequence[Pod]) -> bool:
    """Whether the newest of ``pods`` shows a crash loop: one of its containers, or of its
    init containers, ran, ended, and waits in ``CrashLoopBackOff`` for the kubelet to start
    it again. A kubelet starts a container that ended at once the first time, and backs
    off from the second (10 s, 20 s, ... 5 min): so this is its second exit in a row, a
    second or so after the first, where waiting for ``replicas`` restarts would take
    minutes."""
    live = _live(pods)
    if not live or live[0].status is None:
        return False
    status = live[0].status
    return any(
        _waiting(found)[0] == "CrashLoopBackOff"
        and found.lastState is not None
        and found.lastState.terminated is not None
        for found in [*(status.initContainerStatuses or ()), *(status.containerStatuses or ())]
    )


def _of_template(deployment: Deployment, pods: Sequence[Pod]) -> list[Pod]:
    """The pods made from the Deployment's pod template as it is now: they carry its
    annotations (a restart changes one, ``branchyard.dev/restarted-at``; the pods before
    it carry the old value)."""
    template = deployment.spec.template.metadata if deployment.spec else None
    wanted = (template.annotations if template else None) or {}
    return [
        pod
        for pod in pods
        if wanted.items() <= ((pod.metadata.annotations if pod.metadata else None) or {}).items()
    ]


def _ready(pod: Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or ()
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _live(pods: Sequence[Pod]) -> list[Pod]:
    """The pods not being deleted, newest first."""
    kept = [p for p in pods if p.metadata is None or p.metadata.deletionTimestamp is None]
    return sorted(
        kept,
        key=lambda p: str(p.metadata.creationTimestamp if p.metadata else ""),
        reverse=True,
    )


def _container(pod: Pod, name: str) -> ContainerStatus | None:
    statuses = (pod.status.containerStatuses if pod.status else None) or ()
    return next((s for s in statuses if s.name == name), None)


def _exit_code(status: ContainerStatus | None) -> int | None:
    if status is None:
        return None
    for state in (status.state, status.lastState):
        if state is not None and state.terminated is not None:
            return state.terminated.exitCode
    return None


def _waiting(status: ContainerStatus | None) -> tuple[str, str]:
    """(reason, message) of a waiting container; empty if it is not waiting."""
    if status is None or status.state is None or status.state.waiting is None:
        return "", ""
    return status.state.waiting.reason or "", status.state.waiting.message or ""


def instance_state(pods: Sequence[Pod], container: str = "web") -> Seen:
    """The state of a revision's web process from its pods: RUNNING when a pod is
    Ready; BACKOFF while the kubelet waits to try again (a crash loop, an image it
    cannot pull); FAILED when the pod failed for good; EXITED without a pod (scaled
    to 0) or when it ended; else STARTING (scheduled, fetching, installing, not ready)."""
    live = _live(pods)
    if not live:
        return Seen(InstanceState.EXITED)
    ready = next((p for p in live if _ready(p)), None)
    pod = ready or live[0]
    status = _container(pod, container)
    restarts = status.restartCount if status is not None else 0
    code = _exit_code(status)
    phase = pod.status.phase if pod.status else None
    if ready is not None:
        state = InstanceState.RUNNING
    elif phase == "Failed":
        state = InstanceState.FAILED
    elif phase == "Succeeded":
        state = InstanceState.EXITED
    elif _waiting(status)[0] in BACKING_OFF or any(
        _waiting(s)[0] in BACKING_OFF
        for s in (pod.status.initContainerStatuses if pod.status else None) or ()
    ):
        state = InstanceState.BACKOFF
    else:
        state = InstanceState.STARTING
    return Seen(state, restarts, code)


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_ROOM else line[: MESSAGE_ROOM - 1] + "…"


def _said(reason: str, message: str) -> str:
    return f"{reason}: {_short(message)}" if message else reason


def _init_failure(pod: Pod) -> str | None:
    for status in (pod.status.initContainerStatuses if pod.status else None) or ():
        code = _exit_code(status)
        if code:
            return f"init container {status.name} failed (exit code {code})"
        reason, message = _waiting(status)
        if reason in PULLING:
            return _said(reason, message)
        if reason in BACKING_OFF:
            return f"init container {status.name}: {_said(reason, message)}"
    return None


def _pod_failure(pod: Pod, container: str, health: str) -> str:
    """Why one pod is not ready."""
    status = pod.status
    scheduled = next(
        (c for c in (status.conditions if status else None) or () if c.type == "PodScheduled"),
        None,
    )
    if scheduled is not None and scheduled.status == "False":
        return f"not scheduled: {_short(scheduled.message or scheduled.reason or '')}"
    init = _init_failure(pod)
    if init is not None:
        return init
    web = _container(pod, container)
    reason, message = _waiting(web)
    if reason == "CrashLoopBackOff":
        code = _exit_code(web)
        restarts = web.restartCount if web is not None else 0
        counted = f"{restarts} restart" + ("" if restarts == 1 else "s")
        return f"CrashLoopBackOff: exited with code {code} ({counted})"
    if reason in BACKING_OFF:
        return _said(reason, message)
    code = _exit_code(web)
    if code is not None and status is not None and status.phase == "Failed":
        return f"exited with code {code}"
    return f"not ready: {health}"


def failure(deployment: Deployment | None, pods: Sequence[Pod], health: str) -> str:
    """Why a Deployment is not Available, in one line: what its newest pod waits on,
    or, without a pod, why none was made; ``health`` says what "not ready" means
    (``health check GET /healthz did not pass within 330 s``)."""
    live = _live(pods)
    if live:
        return _pod_failure(live[0], "web", health)
    if deployment is not None:
        made = _condition(deployment, "ReplicaFailure")
        if made is not None and made[0] == "True":
            return f"no pod could be made: {_short(made[2] or made[1])}"
    return "no pod was made"
