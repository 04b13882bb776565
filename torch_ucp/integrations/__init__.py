"""Adapters that make training frameworks save and load through torch_ucp.

* :mod:`torch_ucp.integrations.torchtitan`: TorchTitan's ``CheckpointManager``.

Each adapter imports its framework only when it is imported itself.
"""
