"""The Kubernetes objects of branchyard's words: pure functions, no API server.

:class:`~branchyard.runtime.kube.options.KubeOptions` and a
:class:`~branchyard.runtime.RevisionSpec` go in; typed lightkube objects come out,
ready for a server-side apply (the runtime does that) or for a person to read
(:func:`review`, which ``branchyard k8s render`` prints). docs/kubernetes.md has the
mapping as a table. In short, a revision ``vN`` of SERVICE in namespace NS is:

- the Namespace (:func:`namespace`), labelled as branchyard's, and with an install
  cache (``up --install-cache``) its claim (:func:`install_cache`), which the installs
  reuse environments from (:data:`CACHED_INSTALL`, :func:`install_key`);
- a ConfigMap ``SERVICE-env-HASH`` of its env and, if it has secrets, a Secret
  ``SERVICE-secret-HASH`` of them, both immutable and named by their content
  (:func:`env_objects`); for a private repo (a URL that carries ``USER:TOKEN@``), the
  Secret ``SERVICE-git`` of that login, which only the fetch init container mounts
  (:func:`login_secret`);
- a Deployment ``SERVICE-vN`` for its web process and one ``SERVICE-vN-WORKER`` per
  worker (:func:`deployments`). No image is built: init containers fetch the commit
  into an ``emptyDir`` and install its dependencies into a venv beside it, and the
  process runs in a stock image. User text reaches a shell only as an argument
  (``"$1"``) of a fixed script, never pasted into one;
- the Service ``SERVICE`` that selects the live revision (:func:`live_service`), an
  Ingress when there is a domain (:func:`ingress`), and for a weighted split a Service
  per revision and a Gateway API HTTPRoute (:func:`revision_service`, :func:`route`);
- in a namespace without a peer of its own, an ExternalName Service in its place that
  points at the baseline's (:func:`fallback`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import yaml
from lightkube.generic_resource import GenericNamespacedResource, create_namespaced_resource
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import (
    Capabilities,
    ConfigMapEnvSource,
    Container,
    ContainerPort,
    EmptyDirVolumeSource,
    EnvFromSource,
    EnvVar,
    HTTPGetAction,
    Lifecycle,
    LifecycleHandler,
    NamespaceSpec,
    PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource,
    PodSecurityContext,
    PodSpec,
    PodTemplateSpec,
    Probe,
    ResourceRequirements,
    SeccompProfile,
    SecretEnvSource,
    SecretVolumeSource,
    SecurityContext,
    ServicePort,
    ServiceSpec,
    SleepAction,
    Toleration,
    Volume,
    VolumeMount,
    VolumeResourceRequirements,
)
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.models.networking_v1 import (
    HTTPIngressPath,
    HTTPIngressRuleValue,
    IngressBackend,
    IngressRule,
    IngressServiceBackend,
    IngressSpec,
    ServiceBackendPort,
)
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import (
    ConfigMap,
    Namespace,
    PersistentVolumeClaim,
    Secret,
    Service,
)
from lightkube.resources.networking_v1 import Ingress

from branchyard.errors import UsageError
from branchyard.git import Login, local_path, split_login
from branchyard.naming import BASELINE, dns_label
from branchyard.runtime import RevisionSpec
from branchyard.runtime.kube import names
from branchyard.runtime.kube.options import KubeOptions
from branchyard.runtime.kube.options import Toleration as Tolerated
from branchyard.text import redacted_url

HTTPRoute = create_namespaced_resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
"""The Gateway API's route (a CRD, so not among lightkube's models)."""

KubeObject: TypeAlias = (
    Namespace
    | PersistentVolumeClaim
    | ConfigMap
    | Secret
    | Deployment
    | Service
    | Ingress
    | GenericNamespacedResource
)

PORT = 8080
"""The port every web process listens on (its ``PORT``)."""
HOST = "0.0.0.0"
"""Where it binds (its ``HOST``): every interface, as the kubelet's probe and the Service's
endpoints reach the pod at its IP (locally, ``HOST`` is loopback, in the service's box)."""
SERVICE_PORT = 80
UID = 65534
"""Every container runs as ``nobody``: pushed code is untrusted."""
TMP = "/tmp"
HOME = "/home/service"
SCRATCH_SIZE = "256Mi"
"""What ``/tmp`` and ``HOME`` may each hold (a pod over it is evicted); the local runtime's
``/tmp`` is as large."""
UNROUTED = 5
"""Seconds a web pod keeps serving once told to stop, before its process gets SIGTERM
(a ``preStop`` sleep, done by the kubelet: the image needs no ``sleep``): the Service's
endpoints drop it at once, but each node's kube-proxy (and an Ingress controller) moves
its rules a moment later, and until then requests still arrive."""
REQUESTED = 4
"""A container requests a quarter of its limits: a preview idles most of the time, so a
node packs four times what the limits would let it, and each may still burst to its limit."""
WORKSPACE = "/workspace"
CHECKOUT = f"{WORKSPACE}/src"
VENV = f"{WORKSPACE}/venv"
REDACTED = "(redacted)"
LOGIN = "/run/branchyard/git"
"""Where the fetch container, and it alone, mounts a private repo's :func:`login_secret`
(read-only): the files ``username`` and ``password``."""

LOGIN_HELPER = (
    '!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
    f'"$(cat {LOGIN}/username)" "$(cat {LOGIN}/password)"; }}; f'
)
"""The git credential helper of the fetch: fixed text, never built from a login; it
answers git's ``get`` with the mounted files' content."""

FETCH = f"""set -e
git init -q {CHECKOUT}
cd {CHECKOUT}
git config credential.helper ''
if [ -f {LOGIN}/password ]; then
  git config --add credential.helper '{LOGIN_HELPER}'
fi
git fetch -q --depth 1 "$1" "$2"
git checkout -q FETCH_HEAD
rm -rf .git
"""
"""The fetch init container's script: ``$1`` the repo's URL (never with a login in it),
``$2`` the commit. No credential helper the image's config names is asked (the empty
one drops them); where a login is mounted, git gets it from :data:`LOGIN_HELPER`. Both
are set in the checkout's own config, which goes with its ``.git``."""

_PYTHON = "if command -v python > /dev/null; then python=python; else python=python3; fi\n"
_MAKE = f""""$python" -m venv {VENV}
export PATH="{VENV}/bin:$PATH" VIRTUAL_ENV={VENV}
if [ -f requirements.txt ]; then
  pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
fi
if [ -f pyproject.toml ]; then
  python -c 'import tomllib; print("\\n".join(tomllib.load(open("pyproject.toml", "rb"))\
.get("project", {{}}).get("dependencies", [])))' > {WORKSPACE}/pyproject-requirements.txt
  pip install --no-cache-dir --disable-pip-version-check -r {WORKSPACE}/pyproject-requirements.txt
fi
"""
_BUILD = """for step in "$@"; do
  echo "\\$ $step"
  sh -c "$step"
done
"""

INSTALL = "set -e\n" + _PYTHON + _MAKE + _BUILD
"""The install init container's script: the venv (made by ``python``, else ``python3``,
as Debian's images have only that), the dependencies (as the local runtime installs
them: ``requirements.txt``, ``pyproject.toml``'s), then each build step given as an
argument."""

CACHE = "/cache"
"""Where the install container mounts its service's part of the install cache."""
CACHE_CLAIM = "branchyard-install-cache"
"""The PersistentVolumeClaim of a Namespace's install cache (``up --install-cache``)."""
CACHE_KEEP = 8
"""Environments a service's install cache keeps in a namespace, the most recently used."""
_SAVE = """entry={CACHE}/${{INSTALL_KEY:?}}
rename() {{ "$python" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$1" "$2"; }}
rm -rf {VENV}
if [ -f "$entry/.complete" ] && touch "$entry/.complete" && cp -a "$entry/venv" {VENV}; then
  export PATH="{VENV}/bin:$PATH" VIRTUAL_ENV={VENV}
  echo "reused environment $INSTALL_KEY"
else
  rm -rf {VENV}
{MAKE}  partial="$entry.partial.${{HOSTNAME:-$$}}"
  rm -rf "$partial" 2> /dev/null || true
  if mkdir "$partial" && cp -a {VENV} "$partial/venv" && touch "$partial/.complete"; then
    if [ -e "$entry" ] && [ ! -f "$entry/.complete" ]; then
      rename "$entry" "$partial.unmarked" 2> /dev/null || true
    fi
    rename "$partial" "$entry" 2> /dev/null || rm -rf "$partial"
    echo "installed environment $INSTALL_KEY"
  else
    rm -rf "$partial" 2> /dev/null || true
    echo "installed environment $INSTALL_KEY, not saved: the install cache is full or unwritable"
  fi
fi
ls -t {CACHE}/*/.complete 2> /dev/null | grep -v '[.]partial[.]' | tail -n +{FIRST} \\
  | while read -r mark; do rm -rf "${{mark%/.complete}}"; done || true
find {CACHE} -maxdepth 1 -name '*.partial.*' -mmin +60 -exec rm -rf {{}} + 2> /dev/null || true
""".format(
    CACHE=CACHE,
    VENV=VENV,
    FIRST=CACHE_KEEP + 1,
    MAKE="".join(f"  {line}\n" if line else "\n" for line in _MAKE.splitlines()),
)
CACHED_INSTALL = "set -e\n" + _PYTHON + _SAVE + _BUILD
"""The install script with an install cache (``up --install-cache``), mounted at
:data:`CACHE` and holding one directory per environment, named by ``INSTALL_KEY``
(:func:`install_key`): a ``venv`` and a ``.complete`` mark. An entry with its mark is
copied to the venv's place (the same absolute path, so its scripts' paths hold) and its
mark touched; else (or if that copy fails) the venv is made as :data:`INSTALL` makes
it, and a copy saved under a name of this pod's, marked, then renamed to the entry's
(atomic: an entry is whole or absent; a pod that lost the race drops its copy; an entry
without its mark, left by something else, is moved aside). A cache that is full or
unwritable fails nothing: the copy is not saved, and the line says so. The build steps
run after the save: they change the checkout, not the environment. Then only the
:data:`CACHE_KEEP` entries used last are kept, and copies older than an hour that were
never renamed go."""

RUN = f"""export PATH="{VENV}/bin:$PATH" VIRTUAL_ENV={VENV}
trap 'trap "" TERM; kill -s TERM -- -1' TERM
sh -c "trap : TERM
$1" &
child=$!
wait "$child"
code=$?
while kill -0 "$child" 2> /dev/null; do
  wait "$child"
  code=$?
done
exit "$code"
"""
"""A process's script: the venv first on the PATH, then ``$1``, its command, as a child.
The script is the container's PID 1, which the kernel shields from every signal it has
no handler for: a command run as PID 1 (``exec``) that sets none, as Python does not
for SIGTERM, ignores the kubelet's SIGTERM and holds the pod for its whole grace. So the
script traps SIGTERM and hands it to every other process of the container (``kill -1``
from PID 1: its PID namespace's, the command and whatever it started, ``setsid`` or
not), then waits for the command and exits with its status. The command's own shell
outlives the SIGTERM (``trap : TERM``, as the local runtime's Procfile shell does), so
a process that handles it and exits 0 leaves the status 0, on both runtimes alike."""


def peer_url(peer: str) -> str:
    """How services reach ``peer``: its Service's short name, which resolves in the
    pod's own namespace (a Service of its own there, else the fallback)."""
    return f"http://{names.object_name(peer)}"


def in_cluster(options: KubeOptions, name: str, namespace: str) -> str:
    """The cluster DNS name of the Service ``name`` in branchyard namespace ``namespace``:
    ``NAME.NAMESPACE.svc.CLUSTER_DOMAIN`` (``up --cluster-domain``)."""
    where = names.namespace_name(options.namespace_prefix, namespace)
    return f"{name}.{where}.svc.{options.cluster_domain}"


def public_url(options: KubeOptions, namespace: str, service: str) -> str:
    """Where people reach a service: ``http://SERVICE.NS.DOMAIN`` (its host name as the
    local router's) with a domain, else its Service's name in the cluster."""
    if options.domain:
        return f"http://{dns_label(service)}.{namespace}.{options.domain}"
    return f"http://{in_cluster(options, names.object_name(service), namespace)}"


def namespace(options: KubeOptions, name: str) -> Namespace:
    """The Namespace of branchyard namespace ``name``. It enforces the ``restricted``
    Pod Security Standard, which every pod branchyard makes meets."""
    labels = {
        **names.managed(),
        names.NAMESPACE: name,
        "pod-security.kubernetes.io/enforce": "restricted",
    }
    meta = ObjectMeta(name=names.namespace_name(options.namespace_prefix, name), labels=labels)
    return Namespace(metadata=meta, spec=NamespaceSpec())


def _meta(options: KubeOptions, namespace: str, name: str, labels: Mapping[str, str]) -> ObjectMeta:
    where = names.namespace_name(options.namespace_prefix, namespace)
    return ObjectMeta(name=name, namespace=where, labels=dict(labels))


def install_cache(options: KubeOptions, namespace: str) -> PersistentVolumeClaim | None:
    """The install cache of branchyard namespace ``namespace`` (``up --install-cache``):
    one claim of that size, class and access mode (ReadWriteOnce unless told), which each
    service's install mounts its own part of; None without the option. Deleting the
    Namespace deletes it."""
    if options.install_cache is None:
        return None
    return PersistentVolumeClaim(
        metadata=_meta(options, namespace, CACHE_CLAIM, names.managed()),
        spec=PersistentVolumeClaimSpec(
            accessModes=[options.install_cache_access],
            storageClassName=options.install_cache_class,
            resources=VolumeResourceRequirements(
                requests={"storage": _memory(options.install_cache)}
            ),
        ),
    )


def install_key(options: KubeOptions, spec: RevisionSpec, environment: str) -> str:
    """The install cache's name of the revision's environment: ``environment``, the key
    of its dependency files, repo and namespace (``venvs``' key, as the local runtime's),
    with what else a pod's install reads: the image (its Python) and the index settings
    (the daemon's, and the ``PIP_*`` and ``UV_*`` of the revision's env)."""
    given = {var.name: var.value or "" for var in _index_settings(options, spec)}
    own = {k: v for k, v in spec.env.items() if k.startswith(("PIP_", "UV_"))}
    image = spec.manifest.image or options.image
    return names.content_hash({**given, **own, "environment": environment, "image": image})


def env_objects(options: KubeOptions, spec: RevisionSpec) -> tuple[ConfigMap, Secret | None]:
    """The revision's env: a ConfigMap of what is not secret, a Secret of what is (None
    without secrets). Each is immutable and named by a hash of its content: the same
    env, the same name; a changed value, a new one."""
    plain = {k: v for k, v in spec.env.items() if k not in spec.secret_keys}
    hidden = {k: v for k, v in spec.env.items() if k in spec.secret_keys}
    service = names.object_name(spec.service)
    labels = names.service_labels(spec.service)
    config = ConfigMap(
        metadata=_meta(
            options, spec.namespace, f"{service}-env-{names.content_hash(plain)}", labels
        ),
        data=dict(sorted(plain.items())),
        immutable=True,
    )
    if not hidden:
        return config, None
    secret = Secret(
        metadata=_meta(
            options, spec.namespace, f"{service}-secret-{names.content_hash(hidden)}", labels
        ),
        data={k: base64.b64encode(v.encode()).decode() for k, v in sorted(hidden.items())},
        type="Opaque",
        immutable=True,
    )
    return config, secret


def _login(spec: RevisionSpec) -> Login | None:
    """A remote repo's login, from its URL (``https://USER:TOKEN@host/…``), or None."""
    return split_login(spec.repo_url)[1] if local_path(spec.repo_url) is None else None


def login_secret(options: KubeOptions, spec: RevisionSpec) -> Secret | None:
    """A private repo's login, for the fetch container to mount (:data:`LOGIN`): the
    Secret ``SERVICE-git``, of type ``kubernetes.io/basic-auth``; None for a URL without
    one. One per service, applied with each revision and so kept up to date in place (a
    rollback's pods read the login of now), labelled as the service's: deleting the
    service or its Namespace takes it along."""
    login = _login(spec)
    if login is None:
        return None
    data = {"username": login.username, "password": login.password}
    return Secret(
        metadata=_meta(
            options,
            spec.namespace,
            names.login_name(spec.service),
            names.service_labels(spec.service),
        ),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        type="kubernetes.io/basic-auth",
    )


def source_url(options: KubeOptions, spec: RevisionSpec) -> str:
    """Where a pod fetches the revision's commit: a remote repo's own URL, without the
    login it may carry (the fetch gets that from :func:`login_secret`); for a repo on the
    daemon's machine, the daemon's git server (``options.git_url``)."""
    if local_path(spec.repo_url) is None:
        url, _ = split_login(spec.repo_url)
        shown = redacted_url(url)
        if shown != url:
            raise UsageError(
                f"{spec.service}'s repo URL carries credentials ({shown}) where a pod's spec "
                "would show them: on Kubernetes, give them as an http(s) URL's user and "
                "password (https://USER:TOKEN@host/…), which pods get from a Secret, or "
                "register a clone on this machine (served to pods by up --git-listen)"
            )
        return url
    if options.git_url is None:
        raise UsageError(
            f"{spec.service} is a repo on this machine ({spec.repo_url}): pods fetch it from "
            "the daemon's git server, and none is set (branchyard up --git-listen)"
        )
    return f"{options.git_url.rstrip('/')}/{spec.service}"


def _locked_down() -> SecurityContext:
    return SecurityContext(
        allowPrivilegeEscalation=False,
        capabilities=Capabilities(drop=["ALL"]),
        readOnlyRootFilesystem=True,
    )


def _memory(size: int) -> str:
    """Bytes as a Kubernetes quantity, in the largest binary unit that holds them whole."""
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def resources(options: KubeOptions, spec: RevisionSpec) -> ResourceRequirements:
    """What each container of the revision may use: the manifest's ``memory:`` and
    ``cpu:``, else the options' (``up --box-memory``, ``--box-cpu``), as limits; a quarter
    of them as requests (:data:`REQUESTED`)."""
    memory = spec.manifest.memory or options.memory
    millicores = max(1, round((spec.manifest.cpu or options.cpu) * 1000))
    return ResourceRequirements(
        limits={"cpu": f"{millicores}m", "memory": _memory(memory)},
        requests={
            "cpu": f"{max(1, millicores // REQUESTED)}m",
            "memory": _memory(memory // REQUESTED),
        },
    )


def _index_settings(options: KubeOptions, spec: RevisionSpec) -> list[EnvVar]:
    """The daemon's package index settings for the install, but those the revision's env
    sets itself (its own win, as locally; ``env`` would beat its ``envFrom``)."""
    given = sorted(options.install_env.items())
    return [EnvVar(name=k, value=v) for k, v in given if k not in spec.env]


def _mounts(workspace_read_only: bool) -> list[VolumeMount]:
    """The only places a container writes: ``/tmp``, ``HOME`` and, but in the run
    container, the workspace (the checkout and the venv, read-only to what runs)."""
    return [
        VolumeMount(name="workspace", mountPath=WORKSPACE, readOnly=workspace_read_only),
        VolumeMount(name="tmp", mountPath=TMP),
        VolumeMount(name="home", mountPath=HOME),
    ]


def _install(
    options: KubeOptions, spec: RevisionSpec, key: str | None
) -> tuple[str, list[EnvVar], list[VolumeMount], list[Volume]]:
    """The install's script, its own env and mounts and the pod's volumes for them: with
    an install cache and the revision's environment ``key``, the cached install, its
    entry's name as ``INSTALL_KEY`` (never in the script's text), and the Namespace's
    claim at :data:`CACHE`, of which it sees only its service's directory (``subPath``):
    what a service's install saves only its later installs in that namespace read."""
    if options.install_cache is None or key is None:
        return INSTALL, [], [], []
    claim = PersistentVolumeClaimVolumeSource(claimName=CACHE_CLAIM)
    return (
        CACHED_INSTALL,
        [EnvVar(name="INSTALL_KEY", value=install_key(options, spec, key))],
        [VolumeMount(name="cache", mountPath=CACHE, subPath=names.object_name(spec.service))],
        [Volume(name="cache", persistentVolumeClaim=claim)],
    )


def _toleration(given: Tolerated) -> Toleration:
    if given.value is None:
        return Toleration(key=given.key, operator="Exists", effect=given.effect)
    return Toleration(key=given.key, operator="Equal", value=given.value, effect=given.effect)


def _pod(
    options: KubeOptions,
    spec: RevisionSpec,
    env_from: list[EnvFromSource],
    process: str,
    command: str,
    key: str | None = None,
) -> PodSpec:
    """A pod of the revision: fetch, install and build in init containers, then run
    ``command`` (the web process's, with its port and probe), all as ``nobody`` on a
    read-only root file system; the init containers write the workspace, the process
    reads it. With an install cache, the install reuses the environment ``key`` names."""
    image = spec.manifest.image or options.image
    script, cached, cache_mount, cache_volume = _install(options, spec, key)
    limits = resources(options, spec)
    env = [EnvVar(name="HOME", value=HOME), EnvVar(name="PYTHONUNBUFFERED", value="1")]
    fetch = Container(
        name="fetch",
        image=options.git_image,
        command=["sh", "-c", FETCH, "fetch", source_url(options, spec), spec.sha],
        env=env[:1],
        resources=limits,
        volumeMounts=_mounts(False),
        securityContext=_locked_down(),
    )
    install = Container(
        name="install",
        image=image,
        command=["sh", "-c", script, "install", *spec.manifest.build],
        workingDir=CHECKOUT,
        env=[*env, *_index_settings(options, spec), *cached],
        envFrom=env_from,
        resources=limits,
        volumeMounts=[*_mounts(False), *cache_mount],
        securityContext=_locked_down(),
    )
    private = _login(spec) is not None
    if private:  # the fetch alone reads the login: pushed code runs in the other containers
        fetch.volumeMounts = [
            *_mounts(False),
            VolumeMount(name="login", mountPath=LOGIN, readOnly=True),
        ]
    web = process == names.WEB
    run = Container(
        name=process,
        image=image,
        command=["sh", "-c", RUN, process, command],
        workingDir=CHECKOUT,
        env=[*env, EnvVar(name="HOST", value=HOST), EnvVar(name="PORT", value=str(PORT))]
        if web
        else env,
        envFrom=env_from,
        ports=[ContainerPort(name="http", containerPort=PORT)] if web else None,
        readinessProbe=Probe(
            httpGet=HTTPGetAction(path=spec.manifest.health_path, port=PORT), periodSeconds=2
        )
        if web
        else None,
        lifecycle=Lifecycle(preStop=LifecycleHandler(sleep=SleepAction(seconds=UNROUTED)))
        if web
        else None,
        resources=limits,
        volumeMounts=_mounts(True),
        securityContext=_locked_down(),
    )
    scratch = EmptyDirVolumeSource(sizeLimit=SCRATCH_SIZE)
    volumes = [
        Volume(name="workspace", emptyDir=EmptyDirVolumeSource()),
        Volume(name="tmp", emptyDir=scratch),
        Volume(name="home", emptyDir=scratch),
    ]
    if private:  # files of root's and the fsGroup's (nobody), read-only: 0440
        secret = SecretVolumeSource(secretName=names.login_name(spec.service), defaultMode=0o440)
        volumes.append(Volume(name="login", secret=secret))
    return PodSpec(
        initContainers=[fetch, install],
        containers=[run],
        volumes=[*volumes, *cache_volume],
        terminationGracePeriodSeconds=(UNROUTED if web else 0) + options.stop_grace,
        automountServiceAccountToken=False,
        nodeSelector=dict(options.node_selector) or None,
        tolerations=[_toleration(t) for t in options.tolerations] or None,
        enableServiceLinks=False,  # no docker-link variables (APP_PORT=tcp://...) in the env
        securityContext=PodSecurityContext(
            runAsNonRoot=True,
            runAsUser=UID,
            runAsGroup=UID,
            fsGroup=UID,
            seccompProfile=SeccompProfile(type="RuntimeDefault"),
        ),
    )


def _deployment(
    options: KubeOptions,
    spec: RevisionSpec,
    env_from: list[EnvFromSource],
    name: str,
    process: str,
    command: str,
    key: str | None,
) -> Deployment:
    labels = names.revision_labels(spec.service, spec.ordinal, spec.sha)
    chosen = names.selector(spec.service, spec.ordinal, process)
    deadline = options.build_timeout + math.ceil(spec.manifest.health_timeout)
    return Deployment(
        metadata=_meta(options, spec.namespace, name, {**labels, names.PROCESS: process}),
        spec=DeploymentSpec(
            replicas=1,
            selector=LabelSelector(matchLabels=chosen),
            progressDeadlineSeconds=deadline,
            template=PodTemplateSpec(
                metadata=ObjectMeta(labels={**labels, **chosen}),
                spec=_pod(options, spec, env_from, process, command, key),
            ),
        ),
    )


def deployments(
    options: KubeOptions,
    spec: RevisionSpec,
    config: ConfigMap,
    secret: Secret | None,
    key: str | None = None,
) -> list[Deployment]:
    """The revision's web Deployment, ready when its health path answers, and one per
    worker, without a probe (no Service selects a worker); with an install cache, their
    installs reuse the environment ``key`` (:func:`install_key`) names."""
    env_from = [EnvFromSource(configMapRef=ConfigMapEnvSource(name=_name(config)))]
    if secret is not None:
        env_from.append(EnvFromSource(secretRef=SecretEnvSource(name=_name(secret))))
    web = names.revision_name(spec.service, spec.ordinal)
    made = [_deployment(options, spec, env_from, web, names.WEB, spec.manifest.web, key)]
    for worker, command in spec.manifest.workers:
        name = names.worker_name(spec.service, spec.ordinal, worker)
        process = names.object_name(worker)
        made.append(_deployment(options, spec, env_from, name, process, command, key))
    return made


def _name(thing: ConfigMap | Secret) -> str:
    assert thing.metadata is not None and thing.metadata.name is not None
    return thing.metadata.name


def _http_service(
    options: KubeOptions,
    namespace: str,
    name: str,
    labels: Mapping[str, str],
    chosen: dict[str, str],
) -> Service:
    return Service(
        metadata=_meta(options, namespace, name, labels),
        spec=ServiceSpec(
            selector=chosen,
            ports=[ServicePort(name="http", port=SERVICE_PORT, targetPort=PORT)],
        ),
    )


def live_service(options: KubeOptions, namespace: str, service: str, ordinal: int) -> Service:
    """The Service ``SERVICE``, selecting the web pods of revision ``ordinal``: the
    switch to a new revision is a new selector."""
    return _http_service(
        options,
        namespace,
        names.object_name(service),
        names.service_labels(service),
        names.selector(service, ordinal),
    )


def revision_service(options: KubeOptions, spec: RevisionSpec) -> Service:
    """The Service ``SERVICE-vN`` of one revision, a weighted route's backend."""
    return _http_service(
        options,
        spec.namespace,
        names.revision_name(spec.service, spec.ordinal),
        names.revision_labels(spec.service, spec.ordinal, spec.sha),
        names.selector(spec.service, spec.ordinal),
    )


def fallback(options: KubeOptions, namespace: str, peer: str) -> Service:
    """In a namespace without ``peer`` of its own, the Service ``PEER`` that points at
    the baseline's, so ``http://PEER`` reaches it there (DNS does the fallback)."""
    name = names.object_name(peer)
    return Service(
        metadata=_meta(
            options, namespace, name, {**names.service_labels(peer), names.FALLBACK: "true"}
        ),
        spec=ServiceSpec(type="ExternalName", externalName=in_cluster(options, name, BASELINE)),
    )


def ingress(options: KubeOptions, namespace: str, service: str) -> Ingress | None:
    """The Ingress of ``SERVICE.NS.DOMAIN`` to the Service ``SERVICE``; None without a
    domain."""
    if not options.domain:
        return None
    name = names.object_name(service)
    backend = IngressBackend(
        service=IngressServiceBackend(name=name, port=ServiceBackendPort(number=SERVICE_PORT))
    )
    host = f"{dns_label(service)}.{namespace}.{options.domain}"
    return Ingress(
        metadata=_meta(options, namespace, name, names.service_labels(service)),
        spec=IngressSpec(
            ingressClassName=options.ingress_class,
            rules=[
                IngressRule(
                    host=host,
                    http=HTTPIngressRuleValue(
                        paths=[HTTPIngressPath(path="/", pathType="Prefix", backend=backend)]
                    ),
                )
            ],
        ),
    )


def route(
    options: KubeOptions, namespace: str, service: str, weights: Mapping[int, int]
) -> GenericNamespacedResource:
    """The HTTPRoute that splits the requests to the Service ``SERVICE`` between the
    revisions' own Services (``SERVICE-vN``) by ``weights`` (ordinal -> weight). Its
    parent is the Service itself (the Gateway API's GAMMA: a service mesh applies it to
    the requests of the namespace's pods)."""
    name = names.object_name(service)
    backends = [
        {"name": names.revision_name(service, ordinal), "port": SERVICE_PORT, "weight": weight}
        for ordinal, weight in sorted(weights.items())
    ]
    meta = _meta(options, namespace, name, names.service_labels(service))
    return HTTPRoute(
        apiVersion="gateway.networking.k8s.io/v1",
        kind="HTTPRoute",
        metadata=meta,
        spec={
            "parentRefs": [{"group": "", "kind": "Service", "name": name, "port": SERVICE_PORT}],
            "rules": [{"backendRefs": backends}],
        },
    )


def revision_objects(
    options: KubeOptions, spec: RevisionSpec, key: str | None = None
) -> list[KubeObject]:
    """Everything applied for ``spec`` to run and serve its service, in apply order
    (``key``: its environment's, for an install cache)."""
    config, secret = env_objects(options, spec)
    login = login_secret(options, spec)
    made: list[KubeObject] = [namespace(options, spec.namespace)]
    cache = install_cache(options, spec.namespace)
    if cache is not None:
        made.append(cache)
    made.append(config)
    made += [thing for thing in (secret, login) if thing is not None]
    made += deployments(options, spec, config, secret, key)
    made.append(live_service(options, spec.namespace, spec.service, spec.ordinal))
    entry = ingress(options, spec.namespace, spec.service)
    if entry is not None:
        made.append(entry)
    return made


def redacted(objects: Iterable[KubeObject]) -> list[KubeObject]:
    """``objects`` with every Secret's values replaced by :data:`REDACTED` (its name,
    a hash of the real values for the env's, stays); a login's user name too, which may
    be the token."""
    shown: list[KubeObject] = []
    for thing in objects:
        if isinstance(thing, Secret):
            hidden = dict.fromkeys(thing.data or {}, REDACTED)
            thing = Secret(
                metadata=thing.metadata,
                stringData=hidden,
                type=thing.type,
                immutable=thing.immutable,
            )
        shown.append(thing)
    return shown


_ORDER = {
    kind: rank
    for rank, kind in enumerate(
        ("Namespace", "PersistentVolumeClaim", "ConfigMap", "Secret", "Deployment", "Service")
    )
}
_HEAD = ("apiVersion", "kind", "metadata")


class _Dumper(yaml.SafeDumper):
    """YAML as a person writes it: a text of several lines (a script) as a block."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def to_yaml(objects: Sequence[KubeObject]) -> str:
    """Multi-document YAML, in apply order: the Namespace first, then what the pods need,
    the Deployments, the Services, and what routes to them; each document's
    ``apiVersion``, ``kind`` and ``metadata`` first."""
    ordered = sorted(objects, key=lambda thing: _ORDER.get(str(thing.kind), len(_ORDER)))
    documents: list[dict[str, Any]] = []
    for thing in ordered:
        fields = thing.to_dict()
        documents.append({**{k: fields.pop(k) for k in _HEAD}, **fields})
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False)


def review(options: KubeOptions, spec: RevisionSpec, key: str | None = None) -> str:
    """What ``branchyard k8s render`` prints: :func:`revision_objects` as YAML, secrets
    redacted."""
    return to_yaml(redacted(revision_objects(options, spec, key)))
