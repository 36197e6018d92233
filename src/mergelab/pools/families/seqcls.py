"""Sequence classifiers: any ``AutoModelForSequenceClassification`` checkpoint (BERT/MiniLM, GPT-2, RoBERTa...).

The *body* is the base model (``model.base_model``: ``BertModel``, ``GPT2Model``, ``RobertaModel``...);
it is what gets merged. Each expert's classification module (``classifier`` or ``score``) is kept as its
task's head. The head input is what the architecture's own ``...ForSequenceClassification`` feeds its
classifier, so an expert run through the family gives the expert's own logits (tested):

- ``score`` heads (GPT-2 and other decoder models): the hidden state of the last token that is not the
  pad token (the rightmost ``input_ids != pad_token_id``), as ``GPT2ForSequenceClassification`` does;
  GPT-2 has no pad token, so the tokenizer pads with its end-of-text token, as the experts were trained;
- a linear ``classifier`` over a body with a pooler (BERT): the pooler output;
- a ``classifier`` with ``dense`` and ``out_proj`` (RoBERTa, ELECTRA...): the first token's state, the head
  wrapped so that it takes ``[B, H]``.

Other heads (DistilBERT's ``pre_classifier``...) are refused by name. Inputs are texts or text pairs
``(a, b)`` (GLUE's MNLI, QNLI...), tokenized as the tokenizer's pair encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.core import io
from mergelab.core.errors import InputError
from mergelab.pools.families.base import Family, quiet_transformers, resolve_device, resolve_dtype

PROBE_POOLINGS = ("mean", "first", "last")


class FirstTokenHead(nn.Module):
    """A RoBERTa-style classification head (it reads ``features[:, 0]``) that takes ``[B, H]``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.unsqueeze(1))


def _head_kind(model: nn.Module) -> str:
    if isinstance(getattr(model, "score", None), nn.Module):
        return "last"
    clf = getattr(model, "classifier", None)
    if isinstance(clf, nn.Linear) and getattr(model.base_model, "pooler", None) is not None:
        return "pooler"
    if isinstance(clf, nn.Module) and hasattr(clf, "out_proj") and hasattr(clf, "dense"):
        return "first"
    raise InputError(
        f"{type(model).__name__}: unsupported classification head (expected a 'score' module, a linear "
        "'classifier' over a pooler, or a 'classifier' with dense/out_proj)"
    )


class SequenceClassifierFamily(Family):
    """The base model of an ``AutoModelForSequenceClassification`` checkpoint and its tokenizer, in eval mode."""

    def __init__(
        self,
        model_dir: str | Path,
        max_length: int = 128,
        probe_pooling: str = "mean",
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415

        if probe_pooling not in PROBE_POOLINGS:
            raise InputError(f"probe_pooling must be one of {PROBE_POOLINGS}, got {probe_pooling!r}")
        if max_length < 2:
            raise InputError(f"max_length must be at least 2, got {max_length}")
        self.model_dir = io.resolve_model_path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a model folder (no config.json)")
        self.name = str(model_dir)
        self.max_length = int(max_length)
        self.probe_pooling = probe_pooling
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise InputError(f"{self.model_dir}: the tokenizer has neither a pad nor an end-of-sequence token")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # GPT-2: pad with <|endoftext|>
        self.tokenizer.padding_side = "right"
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(str(self.model_dir))
        self.model_type = model.config.model_type
        self.kind = _head_kind(model)
        self.body: nn.Module = model.base_model.to(self.device, self.dtype).eval()
        pad = model.config.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.pad_token_id)
        self.hidden_size = int(self.body.config.hidden_size)
        self.feature_size = self.hidden_size
        self.n_layers = int(self.body.config.num_hidden_layers)
        self._pretrained = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                            for k, v in self.body.state_dict().items()}
        self.pooling = self.kind  # recorded by saved results

    # ------------------------------------------------------------------ inputs
    def _encode(self, inputs: Sequence[Any], padding: str) -> dict[str, Tensor]:
        if isinstance(inputs, str):
            raise InputError("tokenize takes a list of texts (or text pairs), not one string")
        items = list(inputs)
        if items and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
            enc = self.tokenizer([x[0] for x in items], [x[1] for x in items], padding=padding, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        elif all(isinstance(x, str) for x in items):
            enc = self.tokenizer(items, padding=padding, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        else:
            raise InputError("inputs must all be texts, or all be pairs of texts (a, b)")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v for k, v in enc.items() if k in keep}

    def tokenize(self, inputs: Sequence[Any]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self._encode(inputs, "longest").items()}

    def encode_all(self, inputs: Sequence[Any], chunk: int = 512) -> tuple[dict[str, Tensor], Tensor]:
        parts = [self._encode(inputs[s:s + chunk], "max_length") for s in range(0, len(inputs), chunk)]
        tensors = {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}
        return tensors, tensors["attention_mask"].sum(1)

    def subset(self, batch: Mapping[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
        sub = {k: v[idx] for k, v in batch.items()}
        keep = int(sub["attention_mask"].sum(1).max())
        return {k: v[:, :keep] for k, v in sub.items()}

    # ------------------------------------------------------------------ running
    def _call(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None, hidden: bool):
        kwargs = dict(batch)
        if hidden:
            kwargs["output_hidden_states"] = True
        return self._functional(params, **kwargs)

    def _last_index(self, batch: Mapping[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        non_pad = (ids != self.pad_token_id).to(torch.int32)
        return (torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32) * non_pad).argmax(-1)

    def head_input(self, out, batch: Mapping[str, Tensor]) -> Tensor:
        states = out.last_hidden_state
        if self.kind == "pooler":
            return out.pooler_output
        if self.kind == "first":
            return states[:, 0]
        return states[torch.arange(states.shape[0], device=states.device), self._last_index(batch)]

    def pool_hidden(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        if self.probe_pooling == "first":
            return hidden[:, 0]
        if self.probe_pooling == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), self._last_index(batch)]
        m = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    # ------------------------------------------------------------------ experts
    def load_expert(self, spec: str, where: str = "expert") -> tuple[dict[str, Tensor], nn.Module]:
        """An expert checkpoint's body state dict and its classification head (on the family's device)."""
        from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

        path = io.resolve_model_path(spec)
        try:
            with quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise InputError(f"{where}: {spec}: cannot load a sequence classifier ({exc})") from exc
        if model.config.model_type != self.model_type:
            raise InputError(f"{where}: {spec} is a {model.config.model_type!r} model, the pretrained one is "
                             f"{self.model_type!r}")
        state = self.body_state_from(model.base_model.state_dict(), f"{where}: {spec}")
        head = model.score if self.kind == "last" else model.classifier
        if self.kind == "first":
            head = FirstTokenHead(head)
        return state, head.float().to(self.device).eval()
