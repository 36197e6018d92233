"""LoRA experts: a PEFT LoRA adapter folder read as a *factored* task vector.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, Eq. 3) fine-tunes a weight
W0 [out, in] through a low-rank update: h = W0 x + (alpha / r) B A x, with B [out, r] and A [r, in]. The
expert's task vector on that weight is therefore tau = s B A with s = alpha / r; rsLoRA (Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023) uses s = alpha / sqrt(r)
(``use_rslora``). Every other weight of the model is untouched: its task vector is zero.

:func:`load_lora` reads an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
PEFT's ``save_pretrained`` writes it) against the base model's state dict, with safetensors and json
only (PEFT is not needed), and returns a :class:`LoraTaskVector`: per target weight of the base, a
:class:`LoraModule` (B, A, s) that stays factored; ``vector[key]`` materialises ``s B A`` (in the base
weight's layout) for that one key on demand, so a merge that visits keys one at a time holds one dense
update at a time.

Per module, the rank r is read from A's shape, and must equal ``rank_pattern``'s entry (else ``r``);
alpha is ``alpha_pattern``'s entry (else ``lora_alpha``). A pattern applies to a module when the
module's name is the pattern or ends with ``.`` + pattern (a regular expression), the first matching
pattern winning: PEFT's rule.

Key names. PEFT saves the tensors of module ``M`` of the model it wrapped as
``base_model.model.M.lora_A.weight`` and ``base_model.model.M.lora_B.weight`` (adapter name removed). The
base weight is ``M.weight``. A model saved as the bare body (``BertModel``: ``encoder.layer.0...``) and
the same body inside a task model (``BertForSequenceClassification``: ``bert.encoder.layer.0...``)
differ by a leading prefix, so when ``M.weight`` is not in the base state dict, one prefix is tried for
all the adapter's modules at once: the adapter's first component dropped (an adapter trained on the task
model, merged into the body) or the base's first component added (an adapter trained on the body,
merged into the task model). The first rule under which every module is found wins; none: refused.

Refused, with an :class:`~mergelab.core.errors.InputError` naming the adapter folder and the field:
``peft_type`` other than LORA, ``use_dora`` (the update is not B A), ``bias`` other than "none" and
``lora_bias`` (bias terms trained), ``modules_to_save`` (whole modules trained: a full expert, not an
adapter), ``layer_replication``, ``target_parameters``, ``trainable_token_indices``, the variants whose
forward is not W0 x + s B A x (``alora_invocation_tokens``, ``use_qalora``, ``use_bdlora``,
``monteclora_config``, ``arrow_config``), convolution adapters (A of more than 2 dimensions), and modules
whose name or shape does not match the base. Linear, Conv1D (``fan_in_fan_out``) and Embedding
(``lora_embedding_A``/``lora_embedding_B``: the update is (s B A)^T, [num_embeddings, dim]) targets are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.core.errors import IncompatibleModelsError, InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
PEFT_PREFIX = "base_model.model."
_TENSOR = re.compile(r"(?P<module>.+)\.lora_(?:(?P<which>[AB])\.weight|embedding_(?P<emb>[AB]))")

# config fields that change what the adapter computes beyond W0 + s B A; value -> refused when truthy
_REFUSED_FIELDS = {
    "use_dora": "DoRA rescales the weight's columns (W = m (W0 + s B A) / ||W0 + s B A||): not a low-rank update",
    "lora_bias": "a trained bias vector beside B A",
    "layer_replication": "replicated layers change the model's structure",
    "target_parameters": "LoRA on bare nn.Parameters (not Linear/Conv1D modules)",
    "trainable_token_indices": "trained embedding rows beside the adapter",
    "modules_to_save": "whole modules trained in full (a classifier head, say): a full expert, not an adapter",
    "alora_invocation_tokens": "activated LoRA applies the update only after the invocation tokens",
    "use_qalora": "QA-LoRA feeds pooled inputs to A",
    "use_bdlora": "block-diagonal LoRA factors",
    "monteclora_config": "MonteCLoRA samples its factors",
    "arrow_config": "Arrow routes among adapters per token",
}


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding ``adapter_config.json`` (a PEFT adapter)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: ``delta = s * B @ A`` ([out, in]; transposed to [in, out] with ``fan_in_fan_out``).

    ``key``: the base state dict's key (``...weight``); ``name``: the module's name in the adapter
    (PEFT's, without ``base_model.model.``); ``B`` [out, r] and ``A`` [r, in] in float32. ``embedding``: an
    ``nn.Embedding`` adapter (PEFT's ``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B``
    [dim, r]), whose update (B A)^T is [num_embeddings, dim], the embedding's layout.
    """

    key: str
    name: str
    B: Tensor
    A: Tensor
    scaling: float
    fan_in_fan_out: bool = False
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Tensor:
        """The true update s B A of this module (Hu et al. 2021, Eq. 3), in the base weight's layout."""
        d = (self.B @ self.A) * self.scaling
        return d.T.contiguous() if self.transposed else d

    def delta_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of :meth:`delta` (the base weight's layout), formed from those rows' factors only:
        a streamed merge's slice of the update (:class:`mergelab.methods.streaming.adapters.AdapterSource`)."""
        if self.transposed:  # delta = s (B A)^T: its rows are columns of B A
            return (self.A[:, start:stop].T @ self.B.T) * self.scaling
        return (self.B[start:stop] @ self.A) * self.scaling

    @property
    def transposed(self) -> bool:
        """The base weight is [in, out]: a Conv1D (``fan_in_fan_out``) or an embedding [num_embeddings, dim]."""
        return self.fan_in_fan_out or self.embedding


class LoraTaskVector(Mapping[str, Tensor]):
    """A LoRA expert's task vector, factored: base key -> :class:`LoraModule`.

    As a mapping it yields, for each adapted key, the dense update ``s B A`` materialised on access (one
    key at a time); keys it does not hold are zero in the expert's task vector. ``modules`` holds the
    factors. ``source``: the adapter folder (for messages); ``config``: its ``adapter_config.json``.
    """

    __slots__ = ("modules", "source", "config")

    def __init__(self, modules: Mapping[str, LoraModule], source: str = "", config: Mapping[str, Any] | None = None):
        self.modules = dict(modules)
        self.source = source
        self.config = dict(config or {})

    def __getitem__(self, key: str) -> Tensor:
        return self.modules[key].delta()

    def __contains__(self, key: object) -> bool:  # without forming s B A (Mapping's default would)
        return key in self.modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def to(self, device: str | torch.device) -> LoraTaskVector:
        """The same adapter with its factors on ``device``."""
        from dataclasses import replace  # noqa: PLC0415

        return LoraTaskVector({k: replace(m, A=m.A.to(device), B=m.B.to(device)) for k, m in self.modules.items()},
                              self.source, self.config)

    def dense(self) -> dict[str, Tensor]:
        """Every adapted key's dense update at once (tests and small models)."""
        return {k: m.delta() for k, m in self.modules.items()}

    def numel(self) -> int:
        """Values of the dense update (what a materialised merge touches)."""
        return sum(m.B.shape[0] * m.A.shape[1] for m in self.modules.values())

    def factored_numel(self) -> int:
        return sum(m.B.numel() + m.A.numel() for m in self.modules.values())

    def __repr__(self) -> str:
        return f"LoraTaskVector({self.source!r}, {len(self)} modules, {self.factored_numel():,} factored values)"


def _pattern_value(patterns: Mapping[str, Any], name: str) -> tuple[str, Any] | None:
    """PEFT's per-module pattern rule: the first pattern P with ``name`` matching ``(.*\\.)?(P)$``."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return pat, value
    return None


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter folder ``path``, checked for what we cannot merge exactly."""
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise InputError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise InputError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_file}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InputError(f"{cfg_file}: field 'peft_type' is {peft_type!r}; only LoRA adapters (LORA) are merged")
    for field, why in _REFUSED_FIELDS.items():
        if cfg.get(field):
            raise InputError(f"{cfg_file}: field {field!r} is {cfg[field]!r}; not supported ({why})")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise InputError(f"{cfg_file}: field 'bias' is {bias!r}; only 'none' is supported (trained bias "
                         "vectors are not part of the low-rank update)")
    for field in ("r", "lora_alpha"):
        v = cfg.get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"{cfg_file}: field {field!r} must be a positive number, got {v!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(field) or {}
        if not isinstance(v, dict):
            raise InputError(f"{cfg_file}: field {field!r} must be an object (pattern -> number), got {v!r}")
        cfg[field] = v
    return cfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    for name in ADAPTER_WEIGHTS:
        f = path / name
        if f.is_file():
            from safetensors.torch import load_file

            try:
                return load_file(str(f))
            except Exception as exc:  # truncated or corrupt file
                raise InputError(f"{f}: cannot read ({type(exc).__name__}: {exc}); is the file complete?") from exc
    raise InputError(f"{path}: no {' or '.join(ADAPTER_WEIGHTS)} (adapters saved as .bin are not read; "
                     "re-save with save_pretrained(safe_serialization=True))")


def _key_rule(names: list[str], base: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """``(drop, add)``: base key = add + (name without the prefix drop) + '.weight' for every name, or None."""
    candidates = [("", "")]
    firsts = {n.split(".", 1)[0] for n in names if "." in n}
    if len(firsts) == 1:
        candidates.append((firsts.pop() + ".", ""))
    base_firsts = sorted({k.split(".", 1)[0] + "." for k in base if "." in k})
    candidates += [("", f) for f in base_firsts]
    for drop, add in candidates:
        if all(n.startswith(drop) and f"{add}{n[len(drop):]}.weight" in base for n in names):
            return drop, add
    return None


def load_lora(path: str | os.PathLike[str], base: Mapping[str, Tensor]) -> LoraTaskVector:
    """Read the PEFT LoRA adapter folder ``path`` as a factored task vector over the state dict ``base`` (or any
    mapping of its keys to something with a ``shape``: a streamed merge passes the safetensors header).

    Everything is checked before any update is formed: the config's fields (see the module's docstring),
    every tensor name, each module's presence in ``base``, the shapes of A and B against the base weight
    and the rank against ``rank_pattern``/``r``. Raises :class:`InputError` (or its
    :class:`IncompatibleModelsError`) naming the folder and the field, tensor or module.
    """
    p = Path(path).expanduser()
    cfg = read_adapter_config(p)
    tensors = _read_tensors(p)
    where = str(p)
    pairs: dict[str, dict[str, Tensor]] = {}
    embeddings: set[str] = set()
    for tname, t in tensors.items():
        m = _TENSOR.fullmatch(tname)
        if m is None:
            raise InputError(f"{where}: tensor {tname!r} is not a LoRA factor (<module>.lora_A.weight, lora_B.weight, "
                             "lora_embedding_A/B); the adapter trains something else too (bias, DoRA magnitude, ...)")
        module = m["module"]
        module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        if m["emb"]:
            embeddings.add(module)
        pairs.setdefault(module, {})[m["which"] or m["emb"]] = t
    if not pairs:
        raise InputError(f"{where}: the adapter holds no LoRA factors")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise InputError(f"{where}: module {module!r} has no {missing}.weight")
        if ab["A"].ndim != 2 or ab["B"].ndim != 2:
            raise InputError(f"{where}: module {module!r}: lora_A/lora_B of {ab['A'].ndim}/{ab['B'].ndim} dimensions; "
                             "convolution adapters are not supported (only Linear, Conv1D and Embedding targets)")
    names = sorted(pairs)
    rule = _key_rule(names, base)
    if rule is None:
        missing = [n for n in names if f"{n}.weight" not in base]
        raise IncompatibleModelsError(
            f"{where}: module {missing[0]!r} (tensor {PEFT_PREFIX}{missing[0]}.lora_A.weight) has no weight "
            f"{missing[0]}.weight in the base model, with or without a leading prefix ({len(missing)} module(s) "
            "unmatched). Is the adapter for this base model?")
    drop, add = rule
    fan = bool(cfg.get("fan_in_fan_out", False))
    rslora = bool(cfg.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for name in names:
        key = f"{add}{name[len(drop):]}.weight"
        W = base[key]
        A = pairs[name]["A"].to(torch.float32)
        B = pairs[name]["B"].to(torch.float32)
        r = A.shape[0]
        if B.shape[1] != r:
            raise IncompatibleModelsError(f"{where}: module {name!r}: lora_A has rank {r} but lora_B "
                                          f"{tuple(B.shape)} has {B.shape[1]} columns")
        emb = name in embeddings
        if emb and any(f"{p}{name}.lora_{x}.weight" in tensors for p in ("", PEFT_PREFIX) for x in "AB"):
            raise InputError(f"{where}: module {name!r} has both lora_A/B and lora_embedding_A/B factors")
        want = (B.shape[0], A.shape[1])
        got = tuple(W.shape)
        if len(got) != 2 or (got[::-1] if fan or emb else got) != want:
            layout = ("[num_embeddings, dim] (embedding)" if emb else
                      "[in, out] (fan_in_fan_out)" if fan else "[out, in]")
            raise IncompatibleModelsError(
                f"{where}: module {name!r}: B A is {want[0]}x{want[1]} but the base weight {key!r} is {got} "
                f"(expected {layout}). Is the adapter for this base model?")
        rp = _pattern_value(cfg["rank_pattern"], name)
        r_cfg = rp[1] if rp else cfg["r"]
        if r_cfg != r:
            field = f"rank_pattern[{rp[0]!r}]" if rp else "r"
            raise InputError(f"{where}: module {name!r}: lora_A has rank {r} but field {field} says {r_cfg}")
        ap = _pattern_value(cfg["alpha_pattern"], name)
        alpha = ap[1] if ap else cfg["lora_alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise InputError(f"{where}: field {'alpha_pattern' if ap else 'lora_alpha'}: not a number: {alpha!r}")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise IncompatibleModelsError(f"{where}: module {name!r}: non-finite value(s) in lora_A/lora_B")
        modules[key] = LoraModule(key, name, B, A, float(scaling), fan and not emb, emb)
    return LoraTaskVector(modules, where, cfg)


def merged_state_dict(base: Mapping[str, Tensor], vector: LoraTaskVector, weight: float = 1.0) -> dict[str, Tensor]:
    """``base`` with ``weight * s B A`` added to each adapted weight: the expert as a full model (in the
    base's dtypes). ``merge_and_unload`` of the adapter, for a pool that needs the expert's own body."""
    out = dict(base)
    for key, m in vector.modules.items():
        out[key] = (base[key].to(torch.float32) + weight * m.delta()).to(base[key].dtype)
    return out


__all__ = ["ADAPTER_CONFIG", "LoraModule", "LoraTaskVector", "is_adapter_dir", "load_lora", "merged_state_dict",
           "read_adapter_config"]
