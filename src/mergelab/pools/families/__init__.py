"""Model families: how to load a body and heads, and turn a batch into features and logits.

- :class:`TextClassifierFamily`: an encoder body with mean/CLS pooling (the embedded text benchmark);
- :class:`~mergelab.pools.families.seqcls.SequenceClassifierFamily`: any ``AutoModelForSequenceClassification``
  (BERT, GPT-2, RoBERTa...), each expert's classifier kept as its head;
- :class:`~mergelab.pools.families.clip.CLIPVisionFamily`: CLIP vision towers with zero-shot heads;
- :class:`~mergelab.pools.families.torch_module.TorchModuleFamily`: a plain ``nn.Module`` factory and state dicts.

All share :class:`~mergelab.pools.families.base.Family` (the interface the methods call).
"""

from mergelab.pools.families.base import Family
from mergelab.pools.families.text import TextClassifierFamily, accuracy, predict

__all__ = ["Family", "TextClassifierFamily", "accuracy", "predict"]
