"""What every model family gives the methods: the shared interface and its generic parts.

A *family* wraps one body module (the part that is merged) and says how to

- turn a list of inputs (texts, text pairs, images, tensors) into a batch of tensors: :meth:`Family.tokenize`;
- run the body with any parameter set: :meth:`Family.features` (``[B, feature_size]``, the input of
  the task heads) through :func:`torch.func.functional_call`, so the module itself is never edited;
- find its probe points: the list of ``n_layers`` blocks (:meth:`Family.layer_modules`), the depth a
  parameter acts at (:meth:`Family.layer_of_key`) and the pooled representation ``[B, hidden_size]``
  after any block (:meth:`Family.probe`), which SE-Merging and the analyses use;
- load an expert: its body state dict and its task head (:meth:`Family.load_expert`).

Static evaluation, SE-Merging (:mod:`mergelab.methods.dynamic`) and AdaMerging/SyMerge (:mod:`mergelab.methods.adaptive`)
only call these, so one implementation of each method serves every family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.core.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None): CUDA when present, else CPU; otherwise the device named."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device (expected auto, cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} asked for, but torch sees no CUDA device; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device: {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device: {device!r} asked for, but torch sees no MPS device; use cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading reports (newly initialised or unused weights) while building a body
    out of a larger checkpoint: the parts it reports are the ones the family does not use."""
    from transformers.utils import logging  # noqa: PLC0415

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class _StopForward(Exception):
    """Raised by a probe hook to end a forward pass early."""


def _first(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _first_out(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Family:
    """Generic parts of a family. Subclasses set ``body``, ``device``, ``dtype``, ``n_layers``,
    ``hidden_size`` (probe representation size), ``feature_size`` (head input size) and ``_pretrained``,
    and implement :meth:`tokenize`, :meth:`_call`, :meth:`head_input` and :meth:`pool_hidden`.
    """

    body: nn.Module
    device: torch.device
    dtype: torch.dtype = torch.float32
    n_layers: int
    hidden_size: int
    feature_size: int
    _pretrained: dict[str, Tensor]
    name: str = "family"

    # ------------------------------------------------------------------ state
    def pretrained_state(self) -> dict[str, Tensor]:
        """The pretrained body's state dict (a private copy: editing the body does not change it)."""
        return dict(self._pretrained)

    # ------------------------------------------------------------------ inputs
    def tokenize(self, inputs: Sequence[Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_all(self, inputs: Sequence[Any]) -> tuple[dict[str, Tensor], Tensor | None] | None:
        """Every input encoded once (for adaptation caches): tensors with the inputs along dim 0, and per-row
        lengths when rows are padded along dim 1 (a batch is then cut to its longest row), else None.
        Returning None instead asks the cache to encode each batch when it is drawn."""
        return self.tokenize(list(inputs)), None

    def subset(self, batch: Mapping[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
        """Rows ``idx`` of a batch (families with padding also cut the padding those rows do not need)."""
        return {k: v[idx] for k, v in batch.items()}

    # ------------------------------------------------------------------ running
    def _call(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None, hidden: bool):
        """The body's output for ``batch`` under ``params`` (``None``: the module's own parameters)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def head_input(self, out, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, feature_size]`` from the body's output."""
        raise NotImplementedError  # pragma: no cover - abstract

    def pool_hidden(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, hidden_size]`` from one block's output (the probe representation)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _params(self, params: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        """Parameters in the family's compute precision; half precision is refused when they need grad."""
        if params is None:
            return None
        if self.dtype == torch.float32:
            return dict(params)
        if torch.is_grad_enabled() and any(v.requires_grad for v in params.values()):
            raise InputError(f"dtype {self.dtype} is for inference only; adaptive methods need float32")
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in params.items()}

    def _functional(self, params: Mapping[str, Tensor] | None, *args, **kwargs):
        p = self._params(params)
        if p is None:
            return self.body(*args, **kwargs)
        return torch.func.functional_call(self.body, p, args=args, kwargs=kwargs, strict=False)

    def features(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The heads' input ``[B, feature_size]`` (float32) under body parameters ``params``."""
        return self.head_input(self._call(batch, params, hidden=False), batch).float()

    def logits(self, batch: Mapping[str, Tensor], head: nn.Module, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return head(self.features(batch, params))

    # ------------------------------------------------------------------ probe points
    def block_list_name(self) -> str | None:
        """Dotted name of the ``nn.ModuleList`` of blocks; None: the first list of ``n_layers`` modules."""
        return None

    def _layer_list(self) -> tuple[str, list[tuple[str, nn.Module]]]:
        if not hasattr(self, "_layers_cache"):
            wanted = self.block_list_name()
            for name, mod in self.body.named_modules():
                if wanted is not None and name != wanted:
                    continue
                if isinstance(mod, nn.ModuleList) and (wanted is not None or len(mod) == self.n_layers):
                    self._layers_cache = (name, [(f"{name}.{i}", m) for i, m in enumerate(mod)])
                    break
            else:
                what = f"a module list named {wanted!r}" if wanted else f"a list of {self.n_layers} blocks"
                raise InputError(f"{self.name}: found no {what} in the body; probe layers need one")
        return self._layers_cache

    def layer_modules(self) -> list[nn.Module]:
        """The body's blocks, in order."""
        return [m for _, m in self._layer_list()[1]]

    def layer_of_key(self, key: str) -> int:
        """Probe depth a parameter acts at: 0 before the first block, i inside block i, n_layers + 1 after."""
        prefix, _ = self._layer_list()
        if key.startswith(prefix + "."):
            return int(key[len(prefix) + 1 :].split(".", 1)[0]) + 1
        if not hasattr(self, "_key_order"):
            self._key_order = {k: i for i, k in enumerate(self._pretrained)}
        first = min(i for k, i in self._key_order.items() if k.startswith(prefix + "."))
        return 0 if self._key_order.get(key, first) < first else self.n_layers + 1

    def check_layer(self, layer: int, what: str = "probe layer") -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.n_layers:
            raise InputError(f"{what} must be an integer in 0..{self.n_layers} (0 = embeddings), got {layer!r}")
        return layer

    def probe(
        self,
        batch: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None,
        layers: Sequence[int],
    ) -> dict[int, Tensor]:
        """Pooled representations ``[B, hidden_size]`` after each of ``layers`` (0 = the input of block 1).

        The forward stops right after the deepest layer asked for, so probing layer ``l`` costs about
        ``l / n_layers`` of a full pass.
        """
        if not layers:
            raise InputError("probe needs at least one layer")
        wanted = sorted({self.check_layer(int(v)) for v in layers})
        blocks = self.layer_modules()
        out: dict[int, Tensor] = {}
        deepest = wanted[-1]

        def grab(layer: int, hidden: Tensor) -> None:
            if layer in wanted:
                out[layer] = self.pool_hidden(hidden, batch).float()
            if layer == deepest:
                raise _StopForward

        handles = [blocks[0].register_forward_pre_hook(lambda m, args, kwargs: grab(0, _first(args, kwargs)),
                                                        with_kwargs=True)]
        for i, block in enumerate(blocks[:deepest]):
            handles.append(block.register_forward_hook(lambda m, a, o, i=i: grab(i + 1, _first_out(o))))
        try:
            self._call(batch, params, hidden=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    def route_hook(self, layer: int, fn) -> Any:
        """Register ``fn(pooled [B, hidden_size])`` to run on the representation at probe ``layer`` during a
        forward (single-pass SE-Merging); returns the hook handle. ``batch`` is bound by the caller."""
        blocks = self.layer_modules()
        if layer == 0:
            return blocks[0].register_forward_pre_hook(lambda m, args, kwargs: fn(_first(args, kwargs)),
                                                       with_kwargs=True)
        return blocks[layer - 1].register_forward_hook(lambda m, a, o: fn(_first_out(o)))

    # ------------------------------------------------------------------ experts
    def body_state_from(self, state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
        """The body's keys out of a checkpoint's state dict: keys the checkpoint lacks but the body has as
        buffers or untouched parts are taken from the pretrained body; a missing merged key is an error."""
        out: dict[str, Tensor] = {}
        missing = []
        for k, v in self._pretrained.items():
            if k in state:
                got = state[k]
                if tuple(got.shape) != tuple(v.shape):
                    raise InputError(f"{where}: tensor {k!r} has shape {tuple(got.shape)}, the pretrained body "
                                     f"has {tuple(v.shape)}: not a fine-tuned copy of the same model")
                out[k] = got.to(device=v.device, dtype=v.dtype)  # on the family's device, as theta_0
            else:
                missing.append(k)
                out[k] = v
        if len(missing) == len(self._pretrained):
            raise InputError(f"{where}: none of the body's keys (e.g. {next(iter(self._pretrained))!r}) is in the "
                             "checkpoint: wrong family or wrong model?")
        self._check_missing(missing, where)
        return out

    def _check_missing(self, missing: list[str], where: str) -> None:
        params = {n for n, _ in self.body.named_parameters()}
        absent = [k for k in missing if k in params and k not in self.optional_keys()]
        if absent:
            raise InputError(f"{where}: the checkpoint lacks {len(absent)} body parameter(s), e.g. {absent[0]!r}")

    def optional_keys(self) -> set[str]:
        """Body parameters an expert checkpoint may leave out (taken from the pretrained body)."""
        return set()
