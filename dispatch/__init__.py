"""dispatch: node-aware expert-routing dispatch/combine for Mixture-of-Experts models."""

import torch as _torch

from .buffer import Buffer
from .config import Config
from .errors import PeerTimeoutError
from .event import EventOverlap
from .topology import Topology

# DeepEP's expert-id dtype (its default build): what topk_idx may be cast to (int32 works too).
topk_idx_t = _torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "PeerTimeoutError", "Topology", "topk_idx_t"]
