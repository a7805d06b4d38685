"""sparsecc: a compiler for sparse training of PyTorch models."""
from .backend import UnsupportedGraphError, backend
from .config import Channels, Config, ConfigError, UpdateScheme
from .dynamic import DynamicSparsity
from .explain import explain
from .export import ArtifactError, Runner, load, save
from .optim import SGD, AdamW
from .report import Report, reports
from .search import SearchReport, search_scheme
from .sparsity import NM, Blocks, Sparsity, Unstructured, sparsify
from .train_step import TrainStep, compile_train_step

__all__ = ["AdamW", "ArtifactError", "Blocks", "Channels", "Config", "ConfigError", "DynamicSparsity", "NM", "Report", "SGD",
           "SearchReport", "Sparsity", "TrainStep", "Unstructured", "UnsupportedGraphError", "UpdateScheme", "Runner", "backend",
           "compile_train_step", "explain", "load", "reports", "save", "search_scheme", "sparsify"]
