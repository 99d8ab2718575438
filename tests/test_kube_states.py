"""How pods and Deployments read as ``ps`` states and failure reasons (pure tables)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from branchyard.runtime import InstanceState
from branchyard.runtime.kube import states

HEALTH = "health check GET / did not pass within 2 s"


def pod(
    ready: bool = False,
    phase: str = "Running",
    web: dict[str, Any] | None = None,
    init: list[dict[str, Any]] | None = None,
    scheduled: str | None = None,
    created: str = "2026-01-01T00:00:00Z",
    annotations: dict[str, str] | None = None,
) -> Pod:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "False", "message": scheduled})
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if web is not None:
        status["containerStatuses"] = [
            {"name": "web", "image": "i", "imageID": "", "ready": ready, "restartCount": 0, **web}
        ]
    if init is not None:
        status["initContainerStatuses"] = [
            {"image": "i", "imageID": "", "ready": False, "restartCount": 0, **c} for c in init
        ]
    meta = {"name": "app-v1-x", "creationTimestamp": created, "annotations": annotations}
    return cast(Pod, Pod.from_dict({"metadata": meta, "status": status}))


def waiting(reason: str, message: str = "", **more: Any) -> dict[str, Any]:
    return {"state": {"waiting": {"reason": reason, "message": message}}, **more}


S = InstanceState
P = states.Progress
KILLED = {"state": {"terminated": {"exitCode": 137}}}
INIT_LOOP = [{"name": "install", **waiting("CrashLoopBackOff")}]
INIT_FAILED = [
    {"name": "fetch", "state": {"terminated": {"exitCode": 0}}},
    {"name": "install", "state": {"terminated": {"exitCode": 2}}},
]
PULL = waiting("ImagePullBackOff", 'Back-off pulling image "nope"')
INIT_PULL = [
    {"name": "fetch", "state": {"terminated": {"exitCode": 0}}},
    {"name": "install", **PULL},
]
WAITING = waiting("PodInitializing")
UP = ("Available", "True", "MinimumReplicasAvailable")
DOWN = ("Available", "False", "MinimumReplicasUnavailable")
LATE = ("Progressing", "False", "ProgressDeadlineExceeded")
CRASHED = {
    **waiting("CrashLoopBackOff"),
    "restartCount": 3,
    "lastState": {"terminated": {"exitCode": 1}},
}


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([], states.Seen(S.EXITED)),
        ([pod(ready=True, web={})], states.Seen(S.RUNNING)),
        ([pod(ready=True, web={}), pod(web=CRASHED)], states.Seen(S.RUNNING)),
        ([pod(phase="Pending")], states.Seen(S.STARTING)),
        ([pod(web={})], states.Seen(S.STARTING)),
        ([pod(web=CRASHED)], states.Seen(S.BACKOFF, 3, 1)),
        ([pod(web=PULL)], states.Seen(S.BACKOFF)),
        ([pod(init=INIT_LOOP)], states.Seen(S.BACKOFF)),
        ([pod(phase="Failed", web=KILLED)], states.Seen(S.FAILED, 0, 137)),
        ([pod(phase="Succeeded")], states.Seen(S.EXITED)),
    ],
)  # fmt: skip
def test_pods_read_as_instance_states(pods: list[Pod], expected: states.Seen) -> None:
    assert states.instance_state(pods) == expected


@pytest.mark.parametrize(
    ("pods", "reason"),
    [
        ([pod(web={})], f"not ready: {HEALTH}"),
        ([pod(web=CRASHED)], "CrashLoopBackOff: exited with code 1 (3 restarts)"),
        ([pod(web=PULL)], 'ImagePullBackOff: Back-off pulling image "nope"'),
        ([pod(init=INIT_FAILED)], "init container install failed (exit code 2)"),
        ([pod(init=INIT_LOOP)], "init container install: CrashLoopBackOff"),
        ([pod(init=INIT_PULL, web=WAITING)], 'ImagePullBackOff: Back-off pulling image "nope"'),
        ([pod(phase="Pending", scheduled="0/1 nodes")], "not scheduled: 0/1 nodes"),
        ([], "no pod was made"),
    ],
)  # fmt: skip
def test_why_a_revision_is_not_available_is_one_line_from_its_newest_pod(
    pods: list[Pod], reason: str
) -> None:
    assert states.failure(None, pods, HEALTH) == reason


def deployment(
    generation: int,
    observed: int,
    *conditions: tuple[str, str, str],
    annotations: dict[str, str] | None = None,
    pods: int = 1,
) -> Deployment:
    found = Deployment.from_dict(
        {
            "metadata": {"name": "app-v1", "generation": generation},
            "spec": {"selector": {}, "template": {"metadata": {"annotations": annotations}}},
            "status": {
                "observedGeneration": observed,
                "replicas": pods,
                "updatedReplicas": 1,
                "availableReplicas": 1,
                "conditions": [
                    {"type": t, "status": s, "reason": r, "message": "m"} for t, s, r in conditions
                ],
            },
        }
    )
    assert isinstance(found, Deployment)
    return found


READY = [pod(ready=True, web={})]
RESTARTED = {"branchyard.dev/restarted-at": "2026-01-01T00:01:00Z"}


@pytest.mark.parametrize(
    ("found", "pods", "expected"),
    [
        (None, READY, P.PROGRESSING),
        (deployment(2, 1, UP), READY, P.PROGRESSING),
        (deployment(2, 2, UP), READY, P.AVAILABLE),
        (deployment(2, 2, DOWN), READY, P.PROGRESSING),
        (deployment(2, 2, LATE), READY, P.STALLED),
        (deployment(2, 2, UP, pods=2), READY, P.PROGRESSING),  # a restart: the old pod is up
        (deployment(2, 2, UP), [], P.PROGRESSING),  # the pods' watch is behind: no pod yet
        (deployment(2, 2, UP), [pod(web={})], P.PROGRESSING),  # or it is not Ready there yet
        (deployment(2, 2, UP, annotations=RESTARTED), READY, P.PROGRESSING),  # the old one
    ],
)  # fmt: skip
def test_a_deployment_is_available_only_at_the_generation_applied_with_its_pod_ready(
    found: Deployment | None, pods: list[Pod], expected: states.Progress
) -> None:
    """Its own status says so, and the pods seen say so too: the two watches are separate
    streams, so the Deployment's may say Available before the pods' holds the Ready pod,
    and a start that returned then would read its instance as EXITED."""
    assert states.progress(found, 2, pods=pods) is expected


def test_a_deployment_that_could_not_make_its_pod_says_why() -> None:
    refused = deployment(1, 1, ("ReplicaFailure", "True", "FailedCreate"))
    assert states.failure(refused, [], HEALTH) == "no pod could be made: m"


EXITED = {"state": {"terminated": {"exitCode": 3}}}  # the first exit: started again at once
AGAIN = {"state": {"running": {}}, "restartCount": 1, "lastState": EXITED["state"]}
INIT_CRASHED = [
    {"name": "fetch", "state": {"terminated": {"exitCode": 0}}},
    {"name": "install", **CRASHED},
]
NEWER = "2026-01-01T00:01:00Z"


@pytest.mark.parametrize(
    ("found", "pods", "expected"),
    [
        (deployment(2, 2, DOWN), [pod(web=CRASHED)], P.CRASHING),
        (deployment(2, 2, DOWN), [pod(init=INIT_CRASHED, web=WAITING)], P.CRASHING),
        (deployment(2, 2, DOWN), [pod(web=EXITED)], P.PROGRESSING),
        (deployment(2, 2, DOWN), [pod(web=AGAIN)], P.PROGRESSING),
        (deployment(2, 2, DOWN), [pod(web=waiting("CrashLoopBackOff"))], P.PROGRESSING),
        (deployment(2, 2, DOWN), [pod(web=PULL)], P.PROGRESSING),
        (deployment(2, 2, DOWN), [pod(web={}, created=NEWER), pod(web=CRASHED)], P.PROGRESSING),
        (deployment(2, 2, DOWN, annotations=RESTARTED), [pod(web=CRASHED)], P.PROGRESSING),
        (
            deployment(2, 2, DOWN, annotations=RESTARTED),
            [pod(web=CRASHED, annotations={**RESTARTED, "kubectl.kubernetes.io/x": "y"})],
            P.CRASHING,
        ),
        (deployment(2, 1, DOWN), [pod(web=CRASHED)], P.PROGRESSING),
        (deployment(2, 2, LATE), [pod(web=CRASHED)], P.STALLED),
    ],
)  # fmt: skip
def test_a_start_fails_once_its_newest_pod_crash_loops_not_at_its_deadline(
    found: Deployment, pods: list[Pod], expected: states.Progress
) -> None:
    """As a first start that exits fails locally: a container (or an init container) that
    ended and waits in CrashLoopBackOff, in the newest pod of the template applied. Not a
    first exit, which the kubelet follows with a start at once, nor a container that runs
    again, nor an image it cannot pull yet, nor an older pod's, nor one a restart replaces."""
    assert states.progress(found, 2, pods=pods) is expected


def test_the_reason_a_crash_looping_start_fails_names_the_container_and_its_exit_code() -> None:
    once = {**CRASHED, "restartCount": 1}  # a kubelet's first back-off
    assert states.failure(None, [pod(web=once)], HEALTH) == (
        "CrashLoopBackOff: exited with code 1 (1 restart)"
    )
    crashed = [pod(init=INIT_CRASHED, web=WAITING)]
    assert states.failure(None, crashed, HEALTH) == "init container install failed (exit code 1)"
