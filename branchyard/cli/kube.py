"""``k8s``: what branchyard does on Kubernetes, seen from here. ``k8s render -n NS
SERVICE`` prints the objects the newest revision of a service would be applied as, the
way ``helm template`` does: the daemon renders them (with its Kubernetes options, peer
URLs as that runtime gives them), so this module imports nothing of the Kubernetes
runtime. Each address in them that no pod reaches is one line of warning on stderr."""

from __future__ import annotations

import click

from branchyard.cli.context import Context, namespaced, pass_context


@click.group("k8s")
def k8s() -> None:
    """Kubernetes: the objects branchyard applies."""


@k8s.command()
@click.argument("service")
@namespaced
@pass_context
def render(ctx: Context, service: str, ns: str | None) -> None:
    """Print the Kubernetes objects of SERVICE's newest revision (YAML, secrets redacted)."""
    text, warnings = ctx.client.warned_text(ctx.service_path(ns, service, "kubernetes"))
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(text, nl=False)


COMMANDS = (k8s,)
