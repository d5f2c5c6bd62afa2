"""Layers, each built on nested_learning.ops only."""

from .attention import CausalSelfAttention, KVCache
from .cms import CMSChain, UpdateEvent, UpdateLog
from .common import MLP, RMSNorm
from .self_modifying import SelfModifyingTitans
from .teach import TeachCapture
from .titans import TitansMemory

__all__ = ["CMSChain", "CausalSelfAttention", "KVCache", "MLP", "RMSNorm", "SelfModifyingTitans",
           "TeachCapture", "TitansMemory", "UpdateEvent", "UpdateLog"]
