"""CLIP vision encoders with zero-shot classification heads (the protocol of Ilharco et al., "Editing
Models with Task Arithmetic", ICLR 2023, and the merging papers that follow it).

The *body* is ``CLIPVisionModelWithProjection``: the vision tower plus the visual projection, loaded
from the pretrained CLIP checkpoint. The experts are fine-tuned vision towers (``CLIPVisionModel``
checkpoints, keys ``vision_model.*``); a key an expert lacks (the projection) is the pretrained one.

The head input is the normalised image embedding ``z(x) = P f(x) / ||P f(x)||``. Task t's head is
the zero-shot classifier built with the *pretrained* text tower from the task's class names
``c_1..c_K`` and prompt templates ``p_1..p_M`` (``"a photo of a {}."``)::

    e_{k,m} = g(p_m(c_k)) / ||g(p_m(c_k))||           (text embedding of one prompt, normalised)
    w_k     = mean_m e_{k,m} / ||mean_m e_{k,m}||     (averaged over templates, re-normalised)
    logits  = exp(s) * W z(x),  W = [w_1; ...; w_K]    (s: CLIP's learned log logit scale)

so a head is an ``nn.Linear`` without bias whose weight is ``exp(s) W``. Images go through the
checkpoint's ``CLIPImageProcessor``.
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

PROBE_POOLINGS = ("first", "mean")


def _check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str) or not templates:
        raise InputError("templates must be a non-empty list of prompts containing '{}' (e.g. 'a photo of a {}.')")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise InputError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name")
    return list(templates)


class CLIPVisionFamily(Family):
    """A CLIP vision tower with its projection, the image processor, and zero-shot heads on demand."""

    def __init__(
        self,
        model_dir: str | Path,
        probe_pooling: str = "first",
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection  # noqa: PLC0415

        if probe_pooling not in PROBE_POOLINGS:
            raise InputError(f"probe_pooling must be one of {PROBE_POOLINGS}, got {probe_pooling!r}")
        self.model_dir = io.resolve_model_path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a model folder (no config.json)")
        self.name = str(model_dir)
        self.probe_pooling = probe_pooling
        self.pooling = "clip-normalised"
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        try:
            self.processor = CLIPImageProcessor.from_pretrained(str(self.model_dir))
        except OSError as exc:
            raise InputError(f"{self.model_dir}: no image processor (preprocessor_config.json): {exc}") from exc
        with quiet_transformers():  # the text tower's weights are "unexpected" for the vision model
            self.body: nn.Module = CLIPVisionModelWithProjection.from_pretrained(
                str(self.model_dir), config=_vision_config(self.model_dir))
        self.body.to(self.device, self.dtype).eval()
        cfg = self.body.config
        self.hidden_size = int(cfg.hidden_size)
        self.feature_size = int(cfg.projection_dim)
        self.n_layers = int(cfg.num_hidden_layers)
        self._pretrained = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                            for k, v in self.body.state_dict().items()}

    # ------------------------------------------------------------------ inputs
    def tokenize(self, images: Sequence[Any]) -> dict[str, Tensor]:
        """Images (PIL images, ``HWC`` uint8 arrays or ``CHW`` tensors) through the CLIP image processor."""
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise InputError("tokenize takes a list of images")
        images = list(images)
        if not images:
            raise InputError("tokenize got no images")
        try:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError) as exc:
            raise InputError(f"cannot process the images ({type(images[0]).__name__}): {exc}") from exc
        return {"pixel_values": pixels.to(self.device)}

    def encode_all(self, images: Sequence[Any]) -> None:
        """None: adaptation caches process each batch's images when drawn (a test set's pixels in float32,
        e.g. 20k images x 3 x 224 x 224, would take 12 GB of GPU memory)."""
        return None

    # ------------------------------------------------------------------ running
    def _call(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None, hidden: bool):
        kwargs = {"pixel_values": batch["pixel_values"].to(self.dtype)}
        if hidden:
            kwargs["output_hidden_states"] = True
        return self._functional(params, **kwargs)

    def head_input(self, out, batch: Mapping[str, Tensor]) -> Tensor:
        z = out.image_embeds.float()
        return z / z.norm(dim=-1, keepdim=True)

    def pool_hidden(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return hidden[:, 0] if self.probe_pooling == "first" else hidden.mean(1)

    def hidden_states(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None) -> list[Tensor]:
        out = self._call(batch, params, hidden=True)
        return [self.pool_hidden(h, batch).float() for h in out.hidden_states]

    # ------------------------------------------------------------------ experts and heads
    def optional_keys(self) -> set[str]:
        return {k for k in self._pretrained if k.startswith("visual_projection.")}

    def load_expert(self, spec: str, where: str = "expert") -> tuple[dict[str, Tensor], None]:
        """An expert's body state dict (a fine-tuned vision tower); its head is the task's zero-shot head."""
        state = io.load_state_dict(spec)
        if not any(k.startswith("vision_model.") for k in state):
            # a CLIPVisionModel saved by transformers 5 has no 'vision_model.' prefix (version 4 wrote one)
            state = {k if k.startswith("visual_projection.") else f"vision_model.{k}": v for k, v in state.items()}
        return self.body_state_from(state, f"{where}: {spec}"), None

    @torch.no_grad()
    def zero_shot_head(self, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> nn.Linear:
        """The zero-shot classifier of the module docstring, as ``nn.Linear(projection_dim, K, bias=False)``."""
        if isinstance(class_names, str) or not class_names:
            raise InputError("class_names must be a non-empty list of class names")
        templates = _check_templates(templates)
        model, tokenizer = self._text_tower()
        rows = []
        for name in class_names:
            prompts = [t.replace("{}", str(name)) for t in templates]
            embs = []
            for s in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[s:s + batch_size], padding=True, truncation=True, return_tensors="pt")
                e = _as_tensor(model.get_text_features(**{k: v.to(self.device) for k, v in enc.items()})).float()
                embs.append(e / e.norm(dim=-1, keepdim=True))
            mean = torch.cat(embs).mean(0)
            rows.append(mean / mean.norm())
        weight = torch.stack(rows) * model.logit_scale.exp().float()
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(self.device)
        head.weight.copy_(weight)
        return head.requires_grad_(False).eval()

    def _text_tower(self):
        if not hasattr(self, "_text"):
            from transformers import AutoTokenizer, CLIPModel  # noqa: PLC0415

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                with quiet_transformers():
                    model = CLIPModel.from_pretrained(str(self.model_dir)).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise InputError(f"{self.model_dir}: zero-shot heads need the full CLIP checkpoint (text tower and "
                                 f"tokenizer): {exc}") from exc
            model.vision_model = None  # only the text tower, projection and logit scale are used
            self._text = (model, tokenizer)
        return self._text

    def release_text_tower(self) -> None:
        """Free the text tower once every head is built."""
        self.__dict__.pop("_text", None)


def _vision_config(model_dir: Path):
    """The vision config of a CLIP checkpoint, with the projection size, which CLIP keeps at the top level."""
    from transformers import AutoConfig, CLIPVisionConfig  # noqa: PLC0415

    cfg = AutoConfig.from_pretrained(str(model_dir))
    if getattr(cfg, "model_type", None) == "clip":
        vision = cfg.vision_config
        vision.projection_dim = cfg.projection_dim
        return vision
    if isinstance(cfg, CLIPVisionConfig):
        return cfg
    raise InputError(f"{model_dir}: a {getattr(cfg, 'model_type', '?')!r} model, not a CLIP checkpoint")


def _as_tensor(out) -> Tensor:
    """``get_text_features`` returns a tensor (or, in some transformers versions, an output object)."""
    if isinstance(out, Tensor):
        return out
    for name in ("text_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise InputError("CLIPModel.get_text_features returned no tensor")
