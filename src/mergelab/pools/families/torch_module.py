"""Plain torch modules: a factory ``"pkg.module:function"`` returning an ``nn.Module``, and state dict files.

The user names the head module (``head: fc``): its keys (``fc.*``) are each expert's task head, a copy
of that module per task; the rest of the module is the body that gets merged. The head is replaced by
``nn.Identity`` in the body, so the body's output is the head's input. ``layers`` names the
``nn.ModuleList`` of blocks that SE-Merging probes (optional; without it only static and adaptive
methods apply). Inputs are tensors (one example each, stacked into a batch ``{"x": [B, ...]}``).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.core import io
from mergelab.core.errors import InputError
from mergelab.pools.families.base import Family, resolve_device, resolve_dtype


def import_factory(spec: str):
    """The callable named by ``"pkg.module:function"``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise InputError(f"factory must look like 'pkg.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"factory {spec!r}: cannot import module {mod_name!r} ({exc})") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"factory {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn


class TorchModuleFamily(Family):
    """A user's ``nn.Module`` with a named head; experts are state dicts of the whole module."""

    def __init__(
        self,
        factory: str,
        pretrained: str,
        head: str,
        layers: str | None = None,
        factory_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.name = factory
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        model = import_factory(factory)(**dict(factory_kwargs or {}))
        if not isinstance(model, nn.Module):
            raise InputError(f"factory {factory!r} returned {type(model).__name__}, not an nn.Module")
        state = io.load_state_dict(pretrained)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(f"{pretrained}: does not fit the module from {factory!r}: {exc}") from exc
        try:
            head_module = model.get_submodule(head)
        except AttributeError as exc:
            raise InputError(f"head {head!r}: no such module in {type(model).__name__} "
                             f"(modules: {', '.join(n for n, _ in model.named_children())})") from exc
        self.head_name = head
        self._head_template = copy.deepcopy(head_module).float().eval()
        model.set_submodule(head, nn.Identity())
        self.body: nn.Module = model.to(self.device, self.dtype).eval()
        self._layers_name = layers
        self.n_layers = len(model.get_submodule(layers)) if layers else 0
        self._pretrained = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                            for k, v in self.body.state_dict().items()}
        self.feature_size = int(getattr(head_module, "in_features", 0)) or -1
        self.hidden_size = -1  # known after the first probe; SE-Merging needs only the tensors
        self.pretrained_head = self._head_from(state, pretrained)

    def block_list_name(self) -> str | None:
        if not self._layers_name:
            raise InputError(f"{self.name}: no 'layers' given (the nn.ModuleList of blocks); probes need one")
        return self._layers_name

    def tokenize(self, inputs: Sequence[Tensor] | Tensor) -> dict[str, Tensor]:
        if isinstance(inputs, Tensor):
            x = inputs
        else:
            items = list(inputs)
            if not items or not all(isinstance(t, Tensor) for t in items):
                raise InputError("family 'torch' takes a list of tensors (one example each) or a batch tensor")
            x = torch.stack(items)
        return {"x": x.to(self.device)}

    def _call(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None, hidden: bool):
        x = batch["x"]
        return self._functional(params, x.to(self.dtype) if x.is_floating_point() else x)

    def head_input(self, out, batch: Mapping[str, Tensor]) -> Tensor:
        return out.flatten(1)

    def pool_hidden(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return hidden.flatten(1)

    def _head_from(self, state: Mapping[str, Tensor], where: str) -> nn.Module:
        prefix = self.head_name + "."
        head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        head = copy.deepcopy(self._head_template)
        try:
            head.load_state_dict(head_state)
        except RuntimeError as exc:
            raise InputError(f"{where}: head {self.head_name!r} does not load: {exc}") from exc
        return head.to(self.device).requires_grad_(False).eval()

    def load_expert(self, spec: str, where: str = "expert") -> tuple[dict[str, Tensor], nn.Module]:
        state = io.load_state_dict(spec)
        body = {k: v for k, v in state.items() if not k.startswith(self.head_name + ".")}
        return self.body_state_from(body, f"{where}: {spec}"), self._head_from(state, f"{where}: {spec}")
