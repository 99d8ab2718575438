"""What runs and what happened to it: ``ps``, ``ns ls``, ``logs``, ``url``, ``revisions``,
``events``, and ``rm`` to stop a service until its next push."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import click

from branchyard.cli.context import Context, namespaced, ordinal, pass_context
from branchyard.cli.output import age, event_line, table, terminal_width
from branchyard.client import UNSANDBOXED, path_of

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes


@click.command()
@click.option("-q", "--quiet", is_flag=True, help="Only namespace:service, one a line.")
@click.option("-A", "--all-namespaces", "everything", is_flag=True, help="Every namespace.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@namespaced
@pass_context
def ps(ctx: Context, quiet: bool, everything: bool, fmt: str, ns: str | None) -> None:
    """List what runs in a namespace."""
    namespace = None if everything else ctx.namespace(ns)
    rows: list[shapes.ServiceRow] = ctx.client.call("GET", path_of("services", namespace=namespace))
    if not ctx.client.sandboxed():
        click.echo(f"warning: no sandbox: {UNSANDBOXED}", err=True)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif quiet:
        for line in sorted(f"{r['namespace']}:{r['service']}" for r in rows):
            click.echo(line)
    else:
        cells = []
        notes = []
        for r in rows:
            shown = r["live"] or r["latest"]
            revision = f"v{shown['ordinal']} {shown['sha7']}" if shown else "-"
            state = f"{r['state']}: {r['reason']}" if r["reason"] else r["state"]
            name = f"{r['namespace']}:{r['service']}"
            cells.append([name, revision, state, r["url"], age(r["since"])])
            latest = r["latest"]
            if r["logs_command"] and latest:
                notes.append(
                    f"{name} v{latest['ordinal']} {latest['state']}; see: {r['logs_command']}"
                )
        header = ["SERVICE", "REVISION", "STATE", "URL", "AGE"]
        click.echo(table(header, cells, terminal_width(), squeeze=2))
        for note in notes:
            click.echo(note)


@click.group("ns")
def ns_group() -> None:
    """Namespaces."""


@ns_group.command("ls")
@pass_context
def ns_ls(ctx: Context) -> None:
    """List namespaces, their branch and services."""
    found: list[shapes.Namespace] = ctx.client.call("GET", path_of("namespaces"))
    rows = [[n["namespace"], n["branch"], ", ".join(n["services"])] for n in found]
    click.echo(table(["NAMESPACE", "BRANCH", "SERVICES"], rows))


@click.command()
@click.argument("service")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--build", is_flag=True, help="The build log (of the latest revision by default).")
@click.option("--revision", "rev", metavar="REV", help="That revision's (4 or v4) instead.")
@click.option(
    "--tail", type=click.IntRange(min=0), help="Only the last N lines (then new ones with -f)."
)
@namespaced
@pass_context
def logs(
    ctx: Context,
    service: str,
    follow: bool,
    build: bool,
    rev: str | None,
    tail: int | None,
    ns: str | None,
) -> None:
    """Print a service's output (the live revision's, else the latest's)."""
    path = path_of(
        "namespaces",
        ctx.namespace(ns),
        "services",
        service,
        "logs",
        build=build,
        follow=follow,
        tail=tail,
        revision=ordinal(rev) if rev else None,
    )
    out = sys.stdout.buffer
    for chunk in ctx.client.stream(path):
        out.write(chunk)
        out.flush()


@click.command()
@click.argument("service")
@namespaced
@pass_context
def url(ctx: Context, service: str, ns: str | None) -> None:
    """Print the router URL of a service."""
    row: shapes.ServiceRow = ctx.client.call("GET", ctx.service_path(ns, service))
    click.echo(row["url"])


@click.command("rm")
@click.argument("service")
@namespaced
@pass_context
def rm(ctx: Context, service: str, ns: str | None) -> None:
    """Stop a service in a namespace until its branch gets a new commit."""
    done: shapes.ServiceRemoved = ctx.client.call("DELETE", ctx.service_path(ns, service))
    click.echo(
        f"removed {done['removed']}; the next push to {done['until_next_push_of']} brings it back"
    )


@click.command()
@click.argument("service")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@namespaced
@pass_context
def revisions(ctx: Context, service: str, fmt: str, ns: str | None) -> None:
    """A service's revisions in a namespace, newest first, and why each ended."""
    found: list[shapes.Revision] = ctx.client.call(
        "GET", ctx.service_path(ns, service, "revisions")
    )
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
        return
    rows = [
        [
            f"v{r['ordinal']}",
            r["sha7"],
            r["subject"][:40],
            r["settings"] or "-",
            age(r["created_at"]),
            r["state"],
            r["reason"],
        ]
        for r in found
    ]
    click.echo(table(["REV", "COMMIT", "SUBJECT", "SETTINGS", "CREATED", "STATE", "WHY"], rows))


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("-n", "--namespace", "ns", help="Only this namespace (default: all).")
@pass_context
def events(ctx: Context, follow: bool, ns: str | None) -> None:
    """What happened: pushes, builds, revisions going live, rollbacks, edits, webhooks."""
    namespace = ns or ctx.namespace_option
    found: list[shapes.Event] = ctx.client.call("GET", path_of("events", namespace=namespace))
    for event in found:
        click.echo(event_line(event))
    if not follow:
        return
    after = found[-1]["id"] if found else 0
    query = {"after": after, "namespace": namespace} if namespace else {"after": after}
    for line in ctx.client.lines(f"/events?{urlencode(query)}"):
        if line.startswith("data: "):
            click.echo(event_line(json.loads(line[6:])))


COMMANDS = (ps, ns_group, logs, url, rm, revisions, events)
