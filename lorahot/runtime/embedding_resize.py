"""transformers' ``resize_token_embeddings`` refused, before it changes anything, where lorahot
wraps the model's input or output embeddings.

transformers resizes the input embeddings first and the output embeddings (an untied
``lm_head``) second, and each step refuses a module that is not an ``nn.Embedding`` or
``nn.Linear`` with a ``TypeError``. With lorahot's layer as the head, the call therefore
resized the input embeddings and then failed, leaving the model half resized: embeddings of
the new vocabulary, logits of the old one, and a config that says the old size. :func:`install`
gives the model (each component) a ``resize_token_embeddings`` of its own, an instance
attribute that raises :class:`~lorahot.errors.UsageError` naming the wrapped modules and the
fix, and otherwise calls the class's method; eject takes it away. It holds the model (a
reference cycle the garbage collector frees), so that ``torch.save`` pickles it and
``deepcopy`` gives the copy its own.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import LoRALayer
from lorahot.runtime.hooked import Hooked

__all__ = ["install", "uninstall", "release"]

_NAME = "resize_token_embeddings"

#: the modules :func:`install` gave the method, until :func:`release` takes it away
_HOOKED = Hooked()


def _wrapped(module: nn.Module) -> list[str]:
    """Which of ``module``'s input and output embeddings are lorahot layers, by their paths."""
    names = {id(m): n for n, m in module.named_modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            embeddings = getattr(module, getter)()
        except (AttributeError, NotImplementedError):  # a model that has none
            continue
        if isinstance(embeddings, LoRALayer):
            found.append(names.get(id(embeddings), getter.removeprefix("get_")))
    return found


class _Refusing:
    """The method :func:`install` gives a model: a callable that holds the model (a plain
    object, so that ``torch.save`` pickles it and ``deepcopy`` binds it to the copy)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        wrapped = _wrapped(module)
        if wrapped:
            raise UsageError(
                f"{type(module).__name__}.{_NAME} on a model whose embeddings lorahot wraps ({', '.join(wrapped)}): "
                "transformers would resize the other embeddings and then refuse lorahot's layer, leaving the model "
                "half resized. Nothing was changed. Eject first (runtime.eject()), resize, then inject and load again."
            )
        return getattr(type(module), _NAME)(module, *args, **kwargs)


def install(module: nn.Module) -> None:
    """Gives ``module`` the refusing method, where its class has ``resize_token_embeddings``
    (a transformers model); once, however often called."""
    if not callable(getattr(type(module), _NAME, None)):
        return
    if not isinstance(module.__dict__.get(_NAME), _Refusing):
        module.__dict__[_NAME] = _Refusing(module)
    _HOOKED.add(module)


def uninstall(module: nn.Module) -> None:
    """Takes :func:`install`'s method from ``module`` (a copy's too)."""
    if isinstance(module.__dict__.get(_NAME), _Refusing):
        del module.__dict__[_NAME]


def release(module: nn.Module) -> None:
    """:func:`uninstall` from ``module`` and from every module :func:`install` changed, each once
    it holds no LoRA layer (:class:`~lorahot.runtime.hooked.Hooked`)."""
    _HOOKED.release([module], uninstall)
