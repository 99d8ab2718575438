"""branchyard's benchmarks: push-to-live, the router against nginx, and capacity.

Run them with ``python -m bench`` (see bench/README.md); results go to
bench/RESULTS.md.
"""
