"""Which revision serves a service (docs/rollouts.md): ``rollback``, ``promote``,
``weight`` (these pin it), ``unpin`` (the branch head again) and ``restart``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from branchyard.cli import output
from branchyard.cli.context import Context, assignments, namespaced, ordinal, pass_context
from branchyard.errors import UsageError

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes


@click.command()
@click.argument("service")
@click.argument("revision", required=False)
@namespaced
@pass_context
def rollback(ctx: Context, service: str, revision: str | None, ns: str | None) -> None:
    """Send traffic to an earlier revision (the previous one by default) and pin it."""
    body = {"ordinal": ordinal(revision) if revision else None}
    done: shapes.Pinned = ctx.client.call("POST", ctx.service_path(ns, service, "rollback"), body)
    click.echo(
        f"{ctx.namespace(ns)}:{service} is on v{done['live']}, pinned; new commits "
        f"stage until: branchyard unpin {service}"
    )


@click.command()
@click.argument("service")
@click.argument("revision")
@namespaced
@pass_context
def promote(ctx: Context, service: str, revision: str, ns: str | None) -> None:
    """Send all traffic to a revision (for example a staged one) and pin it."""
    body = {"ordinal": ordinal(revision)}
    done: shapes.Pinned = ctx.client.call("POST", ctx.service_path(ns, service, "promote"), body)
    click.echo(f"{ctx.namespace(ns)}:{service} is on v{done['live']}, pinned")


@click.command()
@click.argument("service")
@namespaced
@pass_context
def restart(ctx: Context, service: str, ns: str | None) -> None:
    """Start the live revision's processes afresh, switching without a gap."""
    done: shapes.Live = ctx.client.call("POST", ctx.service_path(ns, service, "restart"))
    click.echo(f"{ctx.namespace(ns)}:{service} v{done['live']} restarted")


@click.command()
@click.argument("service")
@namespaced
@pass_context
def unpin(ctx: Context, service: str, ns: str | None) -> None:
    """Let traffic follow new commits again: the branch head goes live (built if need be)."""
    done: shapes.Unpinned = ctx.client.call("POST", ctx.service_path(ns, service, "unpin"))
    if done["live"]:
        then = f"; v{done['live']} goes live"
    elif done["building"]:
        then = f"; building the head of {done['branch']} ({done['head'][:7]})"
    else:
        then = ""
    click.echo(f"{ctx.namespace(ns)}:{service} follows new commits{then}")


@click.command()
@click.argument("service")
@click.argument("shares", nargs=-1, required=True, metavar="REV=PCT...")
@namespaced
@pass_context
def weight(ctx: Context, service: str, shares: tuple[str, ...], ns: str | None) -> None:
    """Split traffic between revisions, per request (a canary): weight web 4=90 5=10."""
    weights = {ordinal(rev): pct for rev, pct in assignments(shares).items()}
    try:
        body = {"weights": {rev: int(pct) for rev, pct in weights.items()}}
    except ValueError:
        raise UsageError("each share is REV=PCT with a whole number, like 5=10") from None
    done: shapes.Weights = ctx.client.call("PUT", ctx.service_path(ns, service, "weights"), body)
    shown = output.shares({str(rev): pct for rev, pct in done["weights"].items()})
    click.echo(f"{ctx.namespace(ns)}:{service} traffic: {shown} (pinned)")


COMMANDS = (rollback, promote, restart, unpin, weight)
