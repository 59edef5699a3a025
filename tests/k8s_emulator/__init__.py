"""Kubernetes API server + kubelet emulators for tests (see README.md)."""

from .apiserver import KubeEmulator

__all__ = ["KubeEmulator"]
