"""Running the daemon and looking after it: ``up``, ``info``, ``token rotate``, ``gc``,
and the ways in for a newcomer, ``dashboard`` and ``demo``.

``up`` is the one command that is not a client of the API: it imports the daemon (and
with it the runtime and the router) inside itself, so no other command pays for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from branchyard.cli.context import Context, pass_context
from branchyard.client import UNSANDBOXED, path_of
from branchyard.errors import UsageError
from branchyard.trees import MAX_CHECKOUT

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes


@click.command()
@click.option("--router-port", default=7080, show_default=True, help="0 picks a free port.")
@click.option("--api-port", default=0, show_default=True, help="0 picks a free port.")
@click.option(
    "--api-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the API; anything but loopback needs the token (always made on start).",
)
@click.option(
    "--poll-interval",
    default=5.0,
    show_default=True,
    help="Seconds between checks of remote repos.",
)
@click.option(
    "--drain-grace",
    default=30.0,
    show_default=True,
    help="Seconds in-flight requests get to finish on a replaced revision.",
)
@click.option(
    "--stop-grace",
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when a process (a pod's) is stopped.",
)
@click.option(
    "--api-head-timeout",
    default=30.0,
    show_default=True,
    help="Seconds an API client may take to send a request head, or stay idle between requests.",
)
@click.option(
    "--log-limit",
    default=10 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1024),
    help="Bytes a service's or a build's log may reach before its older part is rotated out.",
)
@click.option(
    "--max-checkout-size",
    default=MAX_CHECKOUT,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes a commit's files may add up to; a bigger commit fails to check out, saying so.",
)
@click.option(
    "--no-sandbox",
    is_flag=True,
    help="Run pushed code without bubblewrap, with the daemon's rights (see docs/security.md).",
)
@click.option(
    "--expose-host-port",
    "exposed",
    multiple=True,
    metavar="PORT",
    type=click.IntRange(1, 65535),
    help="A port on this machine's loopback every box reaches at the same address "
    "(a package index served here); repeatable. Boxes reach nothing else of the host.",
)
@click.option(
    "--pass-env",
    "pass_env",
    multiple=True,
    metavar="NAME",
    help="Hand this variable of the daemon's environment to every box (repeatable); "
    "boxes get none of it otherwise (see docs/security.md).",
)
@click.option(
    "--box-memory",
    default="512Mi",
    show_default=True,
    metavar="SIZE",
    help="Memory a box (on Kubernetes, a pod's container) may use where its branchyard.yaml "
    "says no `memory:` (Ki, Mi, Gi).",
)
@click.option(
    "--box-processes",
    default=1024,
    show_default=True,
    type=click.IntRange(min=16),
    help="Processes and threads a box may have at once.",
)
@click.option(
    "--box-cpu",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Cores a box (a pod's container) may keep busy where its branchyard.yaml says no `cpu:`.",
)
@click.option(
    "--git-listen",
    metavar="HOST:PORT",
    help="Serve local repos read-only over git's smart HTTP here, for Kubernetes pods "
    "(a PORT alone: on 127.0.0.1; see docs/kubernetes.md). Off unless given.",
)
@click.option(
    "--git-url",
    metavar="URL",
    help="The URL pods fetch those repos from, where it is not http://HOST:PORT "
    "(a Service in front of the daemon).",
)
@click.option(
    "--runtime",
    type=click.Choice(["local", "kubernetes"]),
    default="local",
    show_default=True,
    help="What runs revisions: processes here, or a Kubernetes cluster (docs/kubernetes.md).",
)
@click.option("--kubeconfig", metavar="PATH", help="Kubernetes: [KUBECONFIG, ~/.kube/config]")
@click.option("--context", "kube_context", metavar="NAME", help="Kubernetes: the context to use.")
@click.option("--domain", metavar="D", help="Kubernetes: an Ingress per service at SERVICE.NS.D.")
@click.option("--ingress-class", metavar="C", help="Kubernetes: the Ingresses' class.")
@click.option("--image", metavar="I", help="Kubernetes: [python:3.11-slim]")
@click.option(
    "--git-image", metavar="I", help="Kubernetes: the fetch step's image [alpine/git:2.47.2]"
)
@click.option(
    "--cluster-domain",
    default="cluster.local",
    show_default=True,
    metavar="D",
    help="Kubernetes: the cluster's DNS domain (Services are NAME.NS.svc.D).",
)
@click.option(
    "--node-selector",
    "node_labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Kubernetes: run pods only on nodes with this label (repeatable).",
)
@click.option(
    "--toleration",
    "tolerated",
    multiple=True,
    metavar="KEY[=VALUE]:EFFECT",
    help="Kubernetes: pods tolerate this taint, as kubectl taint writes it (repeatable).",
)
@click.option(
    "--install-cache",
    metavar="SIZE",
    help="Kubernetes: a volume of SIZE (Ki, Mi, Gi) per Namespace that installs keep their "
    "environments in, so a rollback or restart reinstalls nothing (docs/kubernetes.md). "
    "Off unless given.",
)
@click.option(
    "--install-cache-class",
    metavar="CLASS",
    help="Kubernetes: the StorageClass of those volumes [the cluster's default].",
)
@click.option(
    "--install-cache-access",
    type=click.Choice(["ReadWriteOnce", "ReadWriteMany"]),
    help="Kubernetes: those volumes' access mode [ReadWriteOnce: a Namespace's pods on one "
    "node]; ReadWriteMany needs a class that serves it (a shared file system).",
)
@click.option("--namespace-prefix", default="", metavar="P", help="Kubernetes: before names")
@click.option(
    "--build-timeout",
    default=300,
    show_default=True,
    type=click.IntRange(min=1),
    help="Kubernetes: seconds a pod may take to fetch, install and build.",
)
@pass_context
def up(
    ctx: Context,
    router_port: int,
    api_port: int,
    api_host: str,
    poll_interval: float,
    drain_grace: float,
    stop_grace: float,
    api_head_timeout: float,
    log_limit: int,
    max_checkout_size: int,
    no_sandbox: bool,
    exposed: tuple[int, ...],
    pass_env: tuple[str, ...],
    box_memory: str,
    box_processes: int,
    box_cpu: float,
    git_listen: str | None,
    git_url: str | None,
    runtime: str,
    kubeconfig: str | None,
    kube_context: str | None,
    domain: str | None,
    ingress_class: str | None,
    image: str | None,
    git_image: str | None,
    cluster_domain: str,
    node_labels: tuple[str, ...],
    tolerated: tuple[str, ...],
    install_cache: str | None,
    install_cache_class: str | None,
    install_cache_access: str | None,
    namespace_prefix: str,
    build_timeout: int,
) -> None:
    """Run the daemon in the foreground (Ctrl-C stops it and everything it started)."""
    import asyncio
    import logging
    import math
    import os

    from branchyard.daemon import (
        LOOPBACK,
        SECRET_VARIABLES,
        KubeOptions,
        Limits,
        Options,
        hide_secrets,
        index_settings,
        node_label,
        serve,
        toleration,
    )
    from branchyard.gitserve import address_of
    from branchyard.manifest import parse_size
    from branchyard.naming import is_domain, is_env_name

    secrets = hide_secrets()
    for name in pass_env:
        if not is_env_name(name) or name in SECRET_VARIABLES:
            raise UsageError(f"--pass-env {name}: not a variable a box may be handed")
    try:
        limits = Limits(parse_size(box_memory), box_processes, box_cpu)
    except ValueError as exc:
        raise UsageError(f"--box-memory {exc}") from None
    if not 0.1 <= poll_interval <= 3600:
        raise UsageError("--poll-interval must be between 0.1 and 3600 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if drain_grace < 0 or stop_grace < 0:
        raise UsageError("--drain-grace and --stop-grace must not be negative")
    if api_head_timeout <= 0:
        raise UsageError("--api-head-timeout must be more than 0 seconds")
    try:
        indexes = index_settings(os.environ)
    except ValueError as exc:
        if runtime == "kubernetes":
            raise UsageError(str(exc)) from None
        indexes = {}  # the local runtime's installs get them; k8s render shows none
    if not is_domain(cluster_domain):
        raise UsageError(f"--cluster-domain {cluster_domain!r} is not a DNS name")
    try:
        node_selector = dict(node_label(label) for label in node_labels)
    except ValueError as exc:
        raise UsageError(f"--node-selector {exc}") from None
    try:
        tolerations = tuple(toleration(taint) for taint in tolerated)
    except ValueError as exc:
        raise UsageError(f"--toleration {exc}") from None
    try:
        cache_size = None if install_cache is None else parse_size(install_cache)
    except ValueError as exc:
        raise UsageError(f"--install-cache {exc}") from None
    for given, flag, what in (
        (install_cache_class, "--install-cache-class", "class"),
        (install_cache_access, "--install-cache-access", "access mode"),
    ):
        if given is not None and cache_size is None:
            raise UsageError(f"{flag} needs --install-cache: it is that volume's {what}")
    if install_cache_class is not None and not is_domain(install_cache_class):
        raise UsageError(f"--install-cache-class {install_cache_class!r} is not a class's name")
    if git_url is not None and git_listen is None:
        raise UsageError("--git-url needs --git-listen: it names where that server is reached")
    try:
        git = None if git_listen is None else address_of(git_listen, git_url, LOOPBACK)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    options = Options(
        ctx.home,
        router_port,
        api_port,
        api_host,
        poll_interval,
        drain_grace,
        stop_grace,
        api_head_timeout,
        log_limit,
        not no_sandbox,
        max_checkout_size,
        exposed=exposed,
        git=git,
        kube=KubeOptions(
            kubeconfig=kubeconfig,
            context=kube_context,
            domain=domain,
            ingress_class=ingress_class,
            namespace_prefix=namespace_prefix,
            build_timeout=build_timeout,
            memory=limits.memory,
            cpu=limits.cpu,
            stop_grace=math.ceil(stop_grace),
            cluster_domain=cluster_domain,
            install_env=indexes,
            node_selector=node_selector,
            tolerations=tolerations,
            install_cache=cache_size,
            install_cache_class=install_cache_class,
            **({"install_cache_access": install_cache_access} if install_cache_access else {}),
            **({"image": image} if image else {}),
            **({"git_image": git_image} if git_image else {}),
        ),
        runtime=runtime,
        secrets=secrets,
        pass_env=frozenset(pass_env),
        limits=limits,
    )
    import uvloop  # libuv's event loop: about 1.5x the connections per second of asyncio's

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))


@click.command()
@pass_context
def info(ctx: Context) -> None:
    """Print the router's and the API's addresses."""
    data: shapes.Info = ctx.client.call("GET", path_of("info"))
    click.echo(f"router  {data['router']}\napi     {data['api']}\nhome    {data['home']}")
    click.echo(f"sandbox {data.get('sandbox') or 'none: ' + UNSANDBOXED}")
    if data.get("limits"):
        click.echo(f"limits  {data['limits']}")
    if data.get("git"):
        click.echo(f"git     {data['git']}")


@click.group()
def token() -> None:
    """The API token (HOME/token, readable only by its owner)."""


@token.command("rotate")
@pass_context
def token_rotate(ctx: Context) -> None:
    """Replace the API token; the old one stops working at once."""
    done: shapes.TokenFile = ctx.client.call("POST", path_of("token", "rotate"))
    click.echo(f"token rotated; the new one is in {done['token_file']}")


@click.command()
@pass_context
def gc(ctx: Context) -> None:
    """Delete builds beyond the kept ones and environments nothing uses (on Kubernetes,
    the objects of services the daemon no longer knows)."""
    freed: shapes.Collected = ctx.client.call("POST", path_of("gc"))
    said = [f"freed {freed['builds_bytes'] / 1e6:.1f} MB of builds"]
    if "environments_removed" in freed:
        said.append(f"removed {freed['environments_removed']} environments")
    if "kubernetes_objects_deleted" in freed:
        said.append(f"deleted {freed['kubernetes_objects_deleted']} Kubernetes objects")
    click.echo(", ".join(said))


@click.command()
@click.option("--open", "open_browser", is_flag=True, help="Also open it in a web browser.")
@pass_context
def dashboard(ctx: Context, open_browser: bool) -> None:
    """Print a link that logs a browser in to the dashboard (once, within 5 minutes)."""
    done: shapes.LoginCode = ctx.client.call("POST", path_of("dashboard", "login-code"))
    click.echo(done["url"])
    click.echo(f"(the link logs in once, within {done['expires_in'] // 60} minutes)", err=True)
    if open_browser:
        import webbrowser

        webbrowser.open(done["url"])


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), default="branchyard-demo")
@pass_context
def demo(ctx: Context, directory: Path) -> None:
    """Create three sample service repos, register them, and print what to try."""
    from branchyard.demo import create_demo, workflow_text

    info_data: shapes.Info = ctx.client.call("GET", path_of("info"))
    try:
        repos = create_demo(directory)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    for made in repos:
        ctx.client.call("POST", path_of("repos"), {"url": str(made.origin), "name": made.name})
        click.echo(f"registered {made.name} ({made.origin})")
    click.echo()
    click.echo(workflow_text(directory.resolve(), info_data["router"]))


COMMANDS = (up, info, token, gc, dashboard, demo)
