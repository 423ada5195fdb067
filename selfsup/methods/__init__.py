"""Self-supervised methods, one file each, registered by name.

Every module in this package is imported here, so adding a method is adding a file: it needs
no edit anywhere else. See ``simclr.py`` for the contract every method follows.
"""
import importlib
import pkgutil

from selfsup.methods.registry import FAMILIES, METHODS, MethodInfo, check_method_params, get_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "METHODS", "MethodInfo", "check_method_params", "get_method", "register"]
