"""Text-encoder classifiers: a transformers encoder body, mean pooling, and one linear head per task.

The body is shared by all tasks (it is what gets merged); each task keeps its own ``nn.Linear`` head.
Any parameter set for the body can be run without touching the module, through
``torch.func.functional_call``: ``features(batch, params)`` with ``params`` a (possibly partial) dict of
floating tensors; missing entries and buffers fall back to the module's own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mergelab.core.batching import iter_batches, progress_bar
from mergelab.core.errors import InputError
from mergelab.pools.families.base import Family

POOLINGS = ("mean", "cls")


class TextClassifierFamily(Family):
    """A pretrained text encoder (``AutoModel``) with its tokenizer, in eval mode, on CPU by default."""

    def __init__(
        self,
        model_dir: str | Path,
        max_length: int = 64,
        pooling: str = "mean",
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415  (slow import)

        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 2:
            raise InputError(f"max_length must be at least 2, got {max_length}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a model folder (no config.json)")
        self.max_length = int(max_length)
        self.pooling = pooling
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.body: nn.Module = AutoModel.from_pretrained(str(self.model_dir)).to(self.device)
        self.body.eval()
        self.hidden_size: int = int(self.body.config.hidden_size)
        self.n_layers: int = int(self.body.config.num_hidden_layers)
        self.feature_size: int = self.hidden_size
        self.name = str(self.model_dir)
        self._pretrained = {k: v.detach().clone() for k, v in self.body.state_dict().items()}
        self._identity: str | None = None

    # ------------------------------------------------------------------ state
    def pretrained_state(self) -> dict[str, Tensor]:
        """The pretrained body's state dict (a private copy: editing the body does not change it)."""
        return dict(self._pretrained)

    def spawn_args(self) -> tuple:
        """Constructor arguments that rebuild this family in another process (parallel fine-tuning)."""
        return (str(self.model_dir), self.max_length, self.pooling, str(self.device))

    def identity(self) -> str:
        """A hash of the pretrained body's tensors and config, and of the pooling and max length."""
        if self._identity is None:
            h = hashlib.sha256()
            config = self.body.config.to_dict()
            config.pop("_name_or_path", None)  # where the model was loaded from is not what it is
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
            for key in sorted(self._pretrained):
                t = self._pretrained[key]
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            h.update(f"pooling={self.pooling};max_length={self.max_length}".encode())
            self._identity = h.hexdigest()
        return self._identity

    def new_head(self, n_classes: int, seed: int | None = None) -> nn.Linear:
        if seed is None:
            return nn.Linear(self.hidden_size, n_classes).to(self.device)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return nn.Linear(self.hidden_size, n_classes).to(self.device)
        finally:
            torch.random.set_rng_state(gen_state)

    # ------------------------------------------------------------------ running
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            raise InputError("tokenize takes a list of texts, not one string")
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def check_texts(self, texts: Sequence[str], owner: str, ids: Sequence[str] | None = None) -> None:
        """Refuse texts the tokenizer reduces to nothing (only special tokens): e.g. control or zero-width
        characters. The model would see an empty input and every such text would get the same prediction."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        empty = [i for i, ids_i in enumerate(enc) if len(ids_i) == 0]
        if empty:
            i = empty[0]
            which = f"example {ids[i]!r}" if ids is not None else f"text {i}"
            raise InputError(f"{owner}: {which} ({texts[i]!r}) tokenizes to nothing with the tokenizer of "
                             f"{self.model_dir}; {len(empty)} such text(s). Remove or fix them.")

    def encode_all(self, texts: Sequence[str], chunk: int = 512) -> tuple[dict[str, Tensor], Tensor]:
        """Every text tokenized once, padded to ``max_length``, with its length (for adaptation caches)."""
        parts: list[dict[str, Tensor]] = []
        for start in range(0, len(texts), chunk):
            enc = self.tokenizer(list(texts[start:start + chunk]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            parts.append(dict(enc))
        tensors = {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}
        return tensors, tensors["attention_mask"].sum(1)

    def subset(self, batch: Mapping[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
        sub = {k: v[idx] for k, v in batch.items()}
        if getattr(self.tokenizer, "padding_side", "right") == "right":  # trim the padding the rows do not need
            keep = int(sub["attention_mask"].sum(1).max())
            sub = {k: v[:, :keep] for k, v in sub.items()}
        return sub

    def _call(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None, hidden: bool):
        kwargs = dict(batch)
        if hidden:
            kwargs["output_hidden_states"] = True
        return self._functional(params, **kwargs)

    _run = _call

    def pool(self, states: Tensor, mask: Tensor) -> Tensor:
        """Pool token states ``[B, L, H]`` into ``[B, H]`` (mean over the attention mask, or the first token)."""
        if self.pooling == "cls":
            return states[:, 0]
        m = mask.to(states.dtype).unsqueeze(-1)
        return (states * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def pool_hidden(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return self.pool(hidden, batch["attention_mask"])

    def head_input(self, out, batch: Mapping[str, Tensor]) -> Tensor:
        return self.pool(out.last_hidden_state, batch["attention_mask"])

    def hidden_states(
        self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None
    ) -> list[Tensor]:
        """Pooled representation after the embeddings and after each layer: ``n_layers + 1`` tensors ``[B, hidden]``."""
        out = self._run(batch, params, hidden=True)
        return [self.pool(h, batch["attention_mask"]) for h in out.hidden_states]


# ---------------------------------------------------------------------------------------------- helpers
def head_classes(head: nn.Module) -> int | None:
    """How many classes a head outputs: its ``out_features``, else its last ``nn.Linear``'s (a head that
    wraps a pooler and a projection, say); ``None`` when it cannot tell."""
    n = getattr(head, "out_features", None)
    if isinstance(n, int):
        return n
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


@torch.no_grad()
def embed(
    family: TextClassifierFamily,
    texts: Sequence[str],
    params: Mapping[str, Tensor] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str | None = None,
) -> Tensor:
    """Pooled features of ``texts`` (``[N, hidden]``, in input order) under body parameters ``params``."""
    out: Tensor | None = None
    bar = progress_bar(len(texts), desc, progress)
    for idx in iter_batches(texts, batch_size):
        feats = family.features(family.tokenize([texts[i] for i in idx]), params)
        if out is None:
            out = torch.empty(len(texts), feats.shape[1], device=family.device)
        out[torch.tensor(idx, device=family.device)] = feats.to(out.dtype)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


@torch.no_grad()
def predict(
    family: TextClassifierFamily,
    texts: Sequence[str],
    head: nn.Linear,
    params: Mapping[str, Tensor] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str | None = None,
) -> torch.LongTensor:
    """Predicted class per text (``LongTensor [N]``, input order)."""
    if len(texts) == 0:
        return torch.empty(0, dtype=torch.long)  # type: ignore[return-value]
    feats = embed(family, texts, params, batch_size, progress, desc)
    return head(feats).argmax(-1).cpu()  # type: ignore[return-value]


def accuracy(
    family: TextClassifierFamily,
    texts: Sequence[str],
    labels: Sequence[int] | Tensor,
    head: nn.Linear,
    params: Mapping[str, Tensor] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str | None = None,
    features: Tensor | None = None,
) -> float:
    """Share of ``texts`` whose predicted class is the label (a fraction in [0, 1]).

    ``features``: the texts' pooled features under ``params`` when already computed (``[N, H]``, input
    order), e.g. by a :class:`~mergelab.pools.evaluate.FeatureCache`; else they are computed here."""
    if len(texts) != len(labels):
        raise InputError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise InputError("accuracy of an empty set of texts")
    y = torch.as_tensor(labels, dtype=torch.long)
    n_out = head_classes(head)
    if n_out is not None and (int(y.min()) < 0 or int(y.max()) >= n_out):
        bad = int(y.max()) if int(y.max()) >= n_out else int(y.min())
        raise InputError(f"{desc or 'accuracy'}: label {bad} is outside the head's classes 0..{n_out - 1}")
    if features is None:
        pred = predict(family, texts, head, params, batch_size, progress, desc)
    else:
        with torch.no_grad():
            pred = head(features).argmax(-1).cpu()
    return float((pred == y).float().mean())
