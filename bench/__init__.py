"""Strata's benchmarks (issue 4): every figure measured side by side with its reference, in one run.

``make bench`` (or ``python -m bench`` from the repository root, as root for loop mounts and
libvirtd) starts its own agents, servers and libvirtd under a temporary directory, prints one table
and writes it to ``bench/last-results.md``. ``python -m bench -h`` lists the options.
"""
