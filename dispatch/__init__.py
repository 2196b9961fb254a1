"""dispatch: node-aware expert-routing dispatch/combine for Mixture-of-Experts models."""

from .buffer import Buffer
from .config import Config
from .errors import PeerTimeoutError
from .event import EventOverlap
from .topology import Topology

__all__ = ["Buffer", "Config", "EventOverlap", "PeerTimeoutError", "Topology"]
