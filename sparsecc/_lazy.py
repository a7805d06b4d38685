"""Lazy package attributes: a public name is imported from its submodule on first use, so `import sparsecc`
(and the `sparsecc` command's --help) does not import torch, Dynamo and Inductor until something needs them."""
from __future__ import annotations

import importlib
import sys


def exports(package: str, table: dict[str, str]):
    """(__getattr__, __dir__) for a package whose public names live in the submodules `table` names."""
    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))
    return __getattr__, __dir__
