"""sparsecc: a compiler for sparse training of PyTorch models."""
from .backend import UnsupportedGraphError, backend
from .config import Channels, Config, ConfigError, UpdateScheme
from .explain import explain
from .report import Report, reports

__all__ = ["Channels", "Config", "ConfigError", "Report", "UnsupportedGraphError", "UpdateScheme",
           "backend", "explain", "reports"]
