"""Backends: where cluster processes run. ``local`` is the embedded default."""

from .base import Backend, BackendError, ClusterLaunch, State

__all__ = ["Backend", "BackendError", "ClusterLaunch", "State"]
