"""Strata's engine: repositories, images, volumes, operations and fixes.

Nothing in this package knows about JSON-RPC; ``rpc`` depends on it, never the reverse.
"""
