"""Tiny Hugging Face models built from configs, for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    w for w in "the a movie film good bad great awful news sport team game vote party election tax "
    "plot story actor music market stock bank economy win lose goal match player president speech "
    "america people country jobs is was it and of to in".split()
]


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(VOCAB) + "\n")
    return path


def tiny_tokenizer():
    """A WordPiece tokenizer over :data:`VOCAB` (given as a dict: ``vocab_file=`` alone maps every word to [UNK])."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})


def tiny_bert_config(**kw):
    from transformers import BertConfig

    cfg = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64)
    cfg.update(kw)
    return BertConfig(**cfg)


def save_tiny_bert(directory: Path, seed: int = 0, perturb: float = 0.0, base: Path | None = None) -> Path:
    """A tiny BertModel saved as a HF directory with a WordPiece tokenizer.

    With ``base`` and ``perturb``, the weights are ``base``'s plus seeded Gaussian noise (an "expert").
    """
    from transformers import BertModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if base is not None:
        model = BertModel.from_pretrained(str(base))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    else:
        model = BertModel(tiny_bert_config())
    model.save_pretrained(str(directory))
    write_vocab(directory / "vocab.txt")
    tiny_tokenizer().save_pretrained(str(directory))
    return directory


def save_tiny_pool(root: Path) -> tuple[Path, Path, Path, Path]:
    """``(root, pretrained, expert a, expert b)``: a tiny BERT and two perturbed copies, as HF folders."""
    pre = save_tiny_bert(root / "pre", seed=0)
    a = save_tiny_bert(root / "a", seed=1, perturb=0.02, base=pre)
    b = save_tiny_bert(root / "b", seed=2, perturb=0.02, base=pre)
    return root, pre, a, b


def tiny_bert_pool(directory: Path, splits_for):
    """A three-task pool over a tiny BERT saved in ``directory``: experts = pretrained + seeded Gaussian noise
    (0.1), random two-class heads; ``splits_for(i, task_name)`` gives each task's ``{"train", "validation",
    "test"}`` splits. Shared by the analysis tests (``test_analysis.py``, ``test_unseen.py``)."""
    from transformers import BertModel

    from mergelab.pools.families.text import TextClassifierFamily
    from mergelab.pools.pool import ModelPool

    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    family = TextClassifierFamily(directory, max_length=12)
    pre = family.pretrained_state()
    g = torch.Generator().manual_seed(0)
    tasks = ["t0", "t1", "t2"]
    bodies = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                  for k, v in pre.items()} for t in tasks}
    heads = {t: torch.nn.Linear(32, 2).eval() for t in tasks}
    splits = {t: splits_for(i, t) for i, t in enumerate(tasks)}
    return ModelPool(family=family, pretrained=pre, experts=bodies, heads=heads, splits=splits)
