"""The tools every adapter shares: routing a method through ours and back, reading modules by attribute path,
checking config flags, binding a call's arguments, counting calls and logging a reason once.

Whatever an adapter swaps, it swaps functions on instances (never classes, modules or parameters), so ``reverse``
restores exactly what was there and ``state_dict()`` never changes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

logger = logging.getLogger("bettertransformer")


class InstanceForward:
    """Route ``module.<method>`` (``forward`` by default, so ``module(...)`` too) through
    ``replacement(stock_method, *args, **kwargs)``.

    The replacement is an instance attribute that carries the stock method's signature and docstring; the class is
    untouched. ``restore`` puts back exactly what was there before (an instance attribute someone else installed,
    or nothing).
    """

    def __init__(self, module: Any, replacement: Callable, method: str = "forward"):
        self.module, self.method = module, method
        self.previous = module.__dict__.get(method)
        stock = getattr(module, method)

        @functools.wraps(stock)
        def routed(*args: Any, **kwargs: Any) -> Any:
            return replacement(stock, *args, **kwargs)

        setattr(module, method, routed)

    def restore(self) -> None:
        """Put back the method that was there before."""
        if self.previous is not None:
            setattr(self.module, self.method, self.previous)
        else:
            self.module.__dict__.pop(self.method, None)


def resolve(root: Any, path: str) -> Any:
    """``resolve(layer, "attention.self.query")`` -> that submodule (or attribute); digits index lists; "" -> root.
    A path of ``|``-separated alternatives resolves the first that exists (``existing_path``)."""
    return _walk(root, existing_path(root, path))


def existing_path(root: Any, path: str) -> str:
    """The first of ``path``'s ``|``-separated alternatives that exists under ``root``; the last when none does
    (resolving it then raises the error). A module that moved between transformers releases is described once, by
    both its paths (DINOv2's query projection: ``attention.q_proj`` in 5.24, ``attention.attention.query`` before)."""
    *alternatives, last = path.split("|")
    for alternative in alternatives:
        try:
            _walk(root, alternative)
        except (AttributeError, IndexError):
            continue
        return alternative
    return last


def has_path(root: Any, path: str) -> bool:
    """Whether ``resolve(root, path)`` finds something."""
    try:
        resolve(root, path)
    except (AttributeError, IndexError):
        return False
    return True


def _walk(root: Any, path: str) -> Any:
    obj: Any = root
    for name in path.split(".") if path else ():
        obj = obj[int(name)] if name.isdigit() else getattr(obj, name)
    return obj


def check_requires(config: Any, requires: Iterable[tuple[str, Any]], what: str) -> None:
    """Raise ``NotImplementedError`` unless every (config attribute, the only supported value) pair holds.

    A missing attribute counts as the supported value (older configs of the same model type)."""
    for flag, supported in requires:
        value = getattr(config, flag, supported)
        if value != supported:
            raise NotImplementedError(
                f"{config.model_type} with {flag}={value!r} is not supported by the {what} (only {flag}={supported!r})"
            )


def bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
    """``signature.bind(*args, **kwargs)``, or None if the signature does not take these arguments."""
    try:
        return signature.bind(*args, **kwargs)
    except TypeError:
        return None


def flat_arguments(bound: inspect.BoundArguments) -> dict[str, Any]:
    """A bound call's arguments by name, ``**kwargs`` flattened in."""
    arguments = dict(bound.arguments)
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def bind_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A call's arguments by name, ``**kwargs`` flattened in; None if the signature does not take them."""
    bound = bind(signature, args, kwargs)
    return None if bound is None else flat_arguments(bound)


class Calls:
    """How many calls took each path (``call_counts``); safe to count from several threads at once."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, path: str) -> None:
        with self._lock:
            self.counts[path] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


class LogOnce:
    """Log each distinct reason once per adapter (INFO unless told otherwise): the first fallback of each kind is
    worth a line, the thousandth is noise."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, reason: str, message: str, *args: Any, level: int = logging.INFO) -> None:
        with self._lock:
            if reason in self._seen:
                return
            self._seen.add(reason)
        logger.log(level, message, *args)


def modules_of_class(root: nn.Module, class_name: str) -> list[nn.Module]:
    """Every module under ``root`` whose class is named ``class_name``."""
    return [m for m in root.modules() if type(m).__name__ == class_name]
