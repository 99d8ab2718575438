"""Custom resource definitions on the test control plane: kwok's (installed at start, for the
pod logs it serves) and the Gateway API's (installed and removed by tests, as the runtime must
work with and without them), both from the cache that tests/k8s_modules.py fills.

``install_gateway_api`` and ``remove_gateway_api`` return only once the API serves the kinds
or no longer does; ``gateway_api_schema`` gives a kind's openAPIV3Schema, to validate an
object offline with jsonschema.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from functools import cache, partial
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.codecs import load_all_yaml
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

from tests.k8s_modules import ModuleError, gateway_api, kwok_crds

FIELD_MANAGER = "k8s-test-cluster"
WAIT = 120.0  # seconds for the API to serve, or stop serving, a CRD's kinds
KWOK_KINDS = ("Logs", "ClusterLogs")  # kwok's CRDs that it reads (--enable-crds)
GATEWAY_API_GROUP = "gateway.networking.k8s.io"


@cache
def documents(folder: Path) -> tuple[dict[str, Any], ...]:
    """The CustomResourceDefinitions of a folder's YAML files (other kinds left out), read
    once (not to be changed: the Gateway API's are 1 MB of YAML)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(
        document
        for path in sorted(folder.glob("*.yaml"))
        for document in yaml.load_all(path.read_text(), Loader=loader)
        if document and document.get("kind") == "CustomResourceDefinition"
    )


def cached(folder: Path | None, what: str) -> Path:
    if folder is None:
        raise ModuleError(f"{what} is not in the cache: run scripts/k8s-test-cluster build")
    return folder


def kwok_definitions() -> list[dict[str, Any]]:
    """kwok's CRDs of the kinds it reads here."""
    folder = cached(kwok_crds().cached(), "kwok's CRDs")
    return [crd for crd in documents(folder) if crd["spec"]["names"]["kind"] in KWOK_KINDS]


def gateway_api_definitions() -> tuple[dict[str, Any], ...]:
    """The CRDs of the Gateway API's standard channel."""
    return documents(cached(gateway_api().cached(), "the Gateway API's CRDs"))


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def api_get(kubeconfig: Path, path: str) -> dict[str, Any] | None:
    """GET ``path`` of the API server as the kubeconfig's user (a kubeconfig as
    tests/k8s_cluster.py writes it); None for 404 Not Found and 429 Too Many Requests."""
    config = json.loads(kubeconfig.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    authority = base64.b64decode(cluster["certificate-authority-data"]).decode()
    request = urllib.request.Request(f"{cluster['server']}{path}")
    request.add_header("Authorization", f"Bearer {user['token']}")
    context = ssl.create_default_context(cadata=authority)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            found: dict[str, Any] = json.load(answer)
            return found
    except urllib.error.HTTPError as error:
        if error.code in (404, 429):
            return None
        raise


def established(client: Client, name: str) -> bool:
    status = client.get(CustomResourceDefinition, name).status
    conditions = (status.conditions if status else None) or ()
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def cache_ready(kubeconfig: Path, definition: dict[str, Any]) -> bool:
    """Whether the API server's watch cache of the CRD's kind answers (a list at
    resourceVersion 0 is served from it, and is 429 while it starts)."""
    spec = definition["spec"]
    [version] = [served["name"] for served in spec["versions"] if served["storage"]]
    path = f"/apis/{spec['group']}/{version}/{spec['names']['plural']}"
    return api_get(kubeconfig, f"{path}?resourceVersion=0&limit=1") is not None


def gone(client: Client, name: str) -> bool:
    try:
        client.get(CustomResourceDefinition, name)
    except ApiError as error:
        if error.status.code == 404:
            return True
        raise
    return False


def install(kubeconfig: Path, definitions: Iterable[dict[str, Any]]) -> None:
    """Apply the CRDs (server-side) and wait until the API serves their kinds.

    It also waits for each kind's storage: the API server makes it on the first request for
    the kind, and a CRD deleted before it is ready stays Terminating for minutes (its
    finalizer's list fails with "storage is (re)initializing" and is retried ever later)."""
    definitions = list(definitions)
    with Client(config=KubeConfig.from_file(kubeconfig)) as client:
        for definition in definitions:
            [crd] = load_all_yaml(yaml.safe_dump(definition))
            client.apply(crd, field_manager=FIELD_MANAGER, force=True)
        for definition in definitions:
            name = definition["metadata"]["name"]
            until(partial(established, client, name), f"CRD {name} established")
            until(partial(cache_ready, kubeconfig, definition), f"the storage of CRD {name}")


def remove(kubeconfig: Path, definitions: Iterable[dict[str, Any]]) -> None:
    """Delete the CRDs (and so every object of their kinds) and wait until they are gone."""
    names = [definition["metadata"]["name"] for definition in definitions]
    with Client(config=KubeConfig.from_file(kubeconfig)) as client:
        for name in names:
            if not gone(client, name):
                client.delete(CustomResourceDefinition, name)
        for name in names:
            until(partial(gone, client, name), f"CRD {name} gone")


def served(kubeconfig: Path, group_version: str) -> list[str]:
    """The resources the API serves in ``group_version`` (from its discovery document, as
    kubectl api-resources reads it); none when it serves no such group."""
    discovery = api_get(kubeconfig, f"/apis/{group_version}")
    return sorted(resource["name"] for resource in (discovery or {}).get("resources", ()))


def install_gateway_api(kubeconfig: Path) -> None:
    install(kubeconfig, gateway_api_definitions())


def remove_gateway_api(kubeconfig: Path) -> None:
    remove(kubeconfig, gateway_api_definitions())


def gateway_api_schema(kind: str, version: str = "v1", *, strict: bool = True) -> dict[str, Any]:
    """The openAPIV3Schema of a Gateway API kind (HTTPRoute, Gateway, ...) at ``version``.

    ``strict`` closes every object schema that lists its properties, so a misspelt field
    fails offline as server-side apply fails it (jsonschema allows unknown properties, the
    API server's structural schemas do not)."""
    for definition in gateway_api_definitions():
        if definition["spec"]["names"]["kind"] != kind:
            continue
        for served in definition["spec"]["versions"]:
            if served["name"] == version:
                schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
                return closed(schema) if strict else schema
    raise KeyError(f"the Gateway API has no {kind} {version}")


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with additionalProperties false wherever it lists properties and neither
    allows others nor preserves unknown fields."""
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    for key, value in schema.items():
        if key == "properties":
            for child in value.values():
                closed(child)
        elif isinstance(value, dict):
            closed(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    closed(item)
    return schema
