"""``python -m bench [PART ...] [--flags]``: run the benchmarks (push, router, capacity,
sandbox, kube, node).

No part named means every part, and RESULTS.md is rewritten; named parts
replace their own sections in it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import capacity, kube, kube_node, push, router, sandbox
from bench.common import ROOT, BenchError
from bench.results import ORDER, Section, product_revision, write

PARTS = {
    "push": push,
    "router": router,
    "capacity": capacity,
    "sandbox": sandbox,
    "kube": kube,
    "node": kube_node,
}


def _command() -> str:
    python = Path(sys.executable)
    shown = str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else str(python)
    return shlex.join([shown, "-m", "bench", *sys.argv[1:]])


def _wait_for_quiet(threshold: float, patience: float) -> None:
    """Let other work on the machine settle before measuring (the load is recorded)."""
    deadline = time.monotonic() + patience
    if os.getloadavg()[0] > threshold and patience > 0:
        print(
            f"bench: waiting up to {patience:g} s for the load average "
            f"({os.getloadavg()[0]:.2f}) to fall to {threshold:g}",
            file=sys.stderr,
            flush=True,
        )
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        time.sleep(5)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "branchyard benchmarks: push-to-live, the router against nginx, capacity, sandbox, "
            "Kubernetes, a real node."
        ),
    )
    parser.add_argument(
        "parts", nargs="*", metavar="PART", help="push, router, capacity, sandbox, kube, node"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "RESULTS.md",
        help="where to write the results (default bench/RESULTS.md)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp directory (repos, homes, logs)"
    )
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=0.5,
        help="before each part, wait for the 1-minute load average to fall to this (0.5)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=600,
        help="...but wait no longer than this many seconds (default 600; 0: never wait)",
    )
    for module in PARTS.values():
        module.add_arguments(parser)
    args = parser.parse_args()
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)} (choose from {', '.join(ORDER)})")
    chosen = [part for part in ORDER if part in args.parts] or list(ORDER)
    full = not args.parts or set(chosen) == set(ORDER)

    command = _command()
    revision = product_revision()  # at the start: the work tree may move during the run
    workdir = Path(tempfile.mkdtemp(prefix="branchyard-bench-"))
    sections: list[Section] = []
    failed: list[str] = []
    try:
        for part in chosen:
            _wait_for_quiet(args.quiet_load, args.quiet_wait)
            print(f"bench: {part} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            try:
                section = PARTS[part].run(args, workdir / part, command)
                section.load_end = os.getloadavg()
                section.revision = product_revision()
            except BenchError as exc:
                print(f"bench: {part} could not run: {exc}", file=sys.stderr, flush=True)
                failed.append(part)
                continue
            sections.append(section)
            print(f"bench: {part} took {time.monotonic() - began:.0f} s", file=sys.stderr)
            for target in section.targets:
                verdict = "PASS" if target.passed else "MISS"
                print(f"  {verdict}  {target.what}: {target.figure} ({target.goal})")
    finally:
        if args.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if sections:
        if product_revision() != revision:
            revision += f"; it changed during the run, to {product_revision()}"
        write(args.results, sections, command, full and not failed, revision)
        print(f"bench: wrote {args.results}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
