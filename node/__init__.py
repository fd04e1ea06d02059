"""The edgeswarm peer: store, transport, Node API and CLI."""

from .config import Config, ConfigError
from .node import Node
from .store import FrameVersion, StoreError

__all__ = ["Config", "ConfigError", "FrameVersion", "Node", "StoreError"]
