"""Model families through the pool YAML path: tiny BERT, GPT-2 and CLIP saved as Hugging Face folders.

Each test writes a pool YAML like a user would, loads it with :func:`mergelab.pools.pool.load_pool_file`, and
checks against references outside the family code: the experts' own Hugging Face models, the Task
Arithmetic formula written out, per-sample materialised merges, CLIP's own ``logits_per_image``, and
SyMerge's first loss computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergelab.core.errors import HubUnavailableError, InputError
from mergelab.methods import plan as make_plan
from mergelab.methods.adaptive import symerge
from mergelab.methods.dynamic import RouterConfig, SEMerging
from mergelab.pools.evaluate import evaluate_tasks
from mergelab.pools.pool import PoolConfig, load_pool, load_pool_file
from tests.tiny_models import VOCAB, tiny_bert_config, tiny_tokenizer

TEXTS = [
    "the movie was good", "bad film", "the team will win the game", "tax vote in the election",
    "the stock market and the bank", "a great actor and music", "the president gave a speech",
    "people of america want jobs",
]
PAIRS = [("the movie was good", "a great film"), ("bad film", "the plot"), ("the team", "will win"),
         ("tax vote", "in the election"), ("the bank", "the market"), ("a great actor", "and music")]


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _write_csv(path: Path, rows: list[tuple], header: tuple) -> Path:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_yaml(path: Path, pool: dict) -> Path:
    path.write_text(yaml.safe_dump({"pool": pool}, sort_keys=False))
    return path


def _gpt2_tokenizer():
    """A byte-level BPE over single characters, GPT-2 style (``<|endoftext|>`` is bos, eos and unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(set("abcdefghijklmnopqrstuvwxyz.,Ġ")):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------- text pools
TEXT_TASKS = {"senti": (2, False), "topic": (3, False), "nli": (3, True)}  # classes, pairs


def _seqcls_pool(root: Path, arch: str) -> Path:
    """Pretrained + 3 experts (perturbed bodies, own heads with 2-3 classes) and their task CSVs."""
    from transformers import BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    if arch == "bert":
        tok = tiny_tokenizer()

        def build(n):
            return BertForSequenceClassification(tiny_bert_config(num_labels=n))
    elif arch == "roberta":
        from transformers import RobertaConfig, RobertaForSequenceClassification

        tok = _gpt2_tokenizer()

        def build(n):
            return RobertaForSequenceClassification(RobertaConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=72, num_labels=n, pad_token_id=0))
    else:
        tok = _gpt2_tokenizer()

        def build(n):
            return GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                                            n_positions=64, num_labels=n, pad_token_id=0))
    pre = build(2)
    pre.save_pretrained(str(root / "pretrained"))
    tok.save_pretrained(str(root / "pretrained"))
    experts, tasks = {}, {}
    for i, (task, (n, pairs)) in enumerate(TEXT_TASKS.items()):
        model = build(n)
        model.base_model.load_state_dict(pre.base_model.state_dict())
        _perturb(model.base_model, seed=10 + i, scale=0.05)
        d = root / f"expert_{task}"
        model.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        experts[task] = str(d)
        if pairs:
            rows = [(a, b, k % n) for k, (a, b) in enumerate(PAIRS)]
            _write_csv(root / f"{task}.csv", rows, ("premise", "hypothesis", "label"))
            tasks[task] = {"path": f"{task}.csv", "text_field": "premise", "text_pair_field": "hypothesis"}
        else:
            _write_csv(root / f"{task}.csv", [(t, k % n) for k, t in enumerate(TEXTS)], ("text", "label"))
            tasks[task] = {"path": f"{task}.csv"}
    pool = {"family": "sequence-classification", "pretrained": "pretrained", "experts":
            {t: Path(p).name for t, p in experts.items()}, "tasks": tasks, "device": "cpu", "max_length": 32}
    return _write_yaml(root / "pool.yaml", pool)


@pytest.fixture(scope="module", params=["bert", "gpt2", "roberta"])
def text_pool(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"pool-{request.param}")
    path = _seqcls_pool(root, request.param)
    return request.param, path, load_pool_file(path)


# ---------------------------------------------------------------------------------------------- CLIP pool
CLIP_CLASSES = {"scenes": ["movie", "game", "market"], "objects": ["bank", "music"]}


def _tiny_clip(root: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    d = root / "clip"
    model.save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(d))
    rng = np.random.default_rng(0)
    from PIL import Image

    for i, (task, classes) in enumerate(CLIP_CLASSES.items()):
        vision = CLIPVisionModel(cfg.vision_config)
        vision.load_state_dict({k[len("vision_model."):]: v for k, v in model.state_dict().items()
                                if k.startswith("vision_model.")})
        _perturb(vision, seed=20 + i, scale=0.05)
        vision.save_pretrained(str(root / f"expert_{task}"))
        if i == 1:  # the hub experts (saved by transformers 4) name their keys vision_model.*
            from safetensors.torch import load_file, save_file

            f = root / f"expert_{task}" / "model.safetensors"
            save_file({f"vision_model.{k}": v for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
        for name in classes:
            (root / task / name).mkdir(parents=True)
            for j in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / task / name / f"{j}.png")
    pool = {"family": "clip-vision", "pretrained": "clip", "device": "cpu",
            "experts": {t: f"expert_{t}" for t in CLIP_CLASSES},
            "templates": ["a photo of a {}.", "the {} is good"],
            "tasks": {"scenes": {"path": "scenes"},
                      "objects": {"path": "objects", "class_names": ["the bank", "music"], "templates": ["a {}"]}}}
    return _write_yaml(root / "pool.yaml", pool)


@pytest.fixture(scope="module")
def clip_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-clip")
    path = _tiny_clip(root)
    return root, load_pool_file(path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-12)).detach())


# ---------------------------------------------------------------------------------------------- tests
def test_seqcls_experts_give_their_own_logits(text_pool) -> None:
    """Expert body + expert head through the family == the expert's own HF model (texts and pairs)."""
    from transformers import AutoModelForSequenceClassification

    arch, path, pool = text_pool
    assert pool.family.kind == {"bert": "pooler", "gpt2": "last", "roberta": "first"}[arch]
    for task, spec in pool.config.experts.items():
        ref_model = AutoModelForSequenceClassification.from_pretrained(str(path.parent / spec)).eval()
        inputs = pool.data[task].inputs
        batch = pool.family.tokenize(inputs)
        with torch.no_grad():
            ref = ref_model(**batch).logits
            got = pool.family.logits(batch, pool.heads[task], pool.experts[task])
        assert got.shape == (len(inputs), TEXT_TASKS[task][0])
        assert _rel(got, ref) < 1e-5
    if arch == "gpt2":  # right padding with <|endoftext|>: the shorter texts were padded
        batch = pool.family.tokenize(TEXTS)
        assert (batch["input_ids"] == 0).any() and pool.family.tokenizer.pad_token == "<|endoftext|>"


def test_static_merge_through_pool_matches_formula(text_pool) -> None:
    """Task Arithmetic on the pool == theta_0 + 0.3 * sum_t (theta_t - theta_0), and the merged body run
    through the family == the HF model with the merged body loaded into it."""
    from transformers import AutoModelForSequenceClassification

    arch, path, pool = text_pool
    merged = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3).apply(pool.pretrained)
    for k, v0 in pool.pretrained.items():
        if v0.is_floating_point():
            expect = v0 + 0.3 * sum(pool.experts[t][k] - v0 for t in pool.tasks)
            assert torch.allclose(merged[k], expect, atol=1e-6), k
    task = "topic"
    hf = AutoModelForSequenceClassification.from_pretrained(str(path.parent / pool.config.experts[task])).eval()
    hf.base_model.load_state_dict(merged)
    batch = pool.family.tokenize(pool.data[task].inputs)
    with torch.no_grad():
        assert _rel(pool.family.logits(batch, pool.heads[task], merged), hf(**batch).logits) < 1e-5
        pred = hf(**batch).logits.argmax(-1)
    acc = evaluate_tasks(pool.family, merged, pool.heads, {task: pool.data[task]})
    assert acc[task] == pytest.approx(float((pred == torch.tensor(pool.data[task].labels)).float().mean()))


def test_se_merging_exact_equals_materialised_reference(text_pool) -> None:
    _, _, pool = text_pool
    plan = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3)
    se = SEMerging(pool.family, pool.pretrained, plan, pool.experts, RouterConfig(layer=1, normalisation="relative"))
    batch = pool.family.tokenize(pool.data["senti"].inputs + pool.data["topic"].inputs[:3])
    exact, routing = se.features(batch, "exact")
    ref, _ = se.features(batch, "reference", routing=routing)
    assert exact.shape == (len(batch["input_ids"]), pool.family.feature_size)
    assert _rel(exact, ref) < 1e-5
    assert torch.allclose(routing.coefficients.sum(1), routing.coefficients.sum(1)[0].expand(len(exact)), atol=1e-5)


def _symerge_first_loss_by_hand(pool, task: str) -> float:
    """SyMerge's loss at its first step when the batch holds all of ``task``'s inputs (order-free):
    theta = theta_0 + 0.3 sum_t tau_t; expert labels y_e = argmax p_e, c_e = max p_e; merged p_m;
    keep = [argmax p_m == y_e] or [c_e >= max p_m]; loss = sum_keep CE(p_m, y_e) / #keep."""
    fam, head = pool.family, pool.heads[task]
    theta = {k: v + 0.3 * sum(pool.experts[t][k] - v for t in pool.tasks) if v.is_floating_point() else v
             for k, v in pool.pretrained.items()}
    batch = fam.tokenize(pool.inputs(task))
    with torch.no_grad():
        p_e = torch.softmax(head(fam.features(batch, pool.experts[task])), -1)
        logits_m = head(fam.features(batch, theta))
    c_e, y_e = p_e.max(-1)
    c_m, y_m = torch.softmax(logits_m, -1).max(-1)
    keep = (y_m == y_e) | (c_e >= c_m)
    ce = -torch.log_softmax(logits_m, -1)[torch.arange(len(y_e)), y_e]
    return float(ce[keep].sum() / keep.sum())


def _check_symerge(pool, batch_size: int) -> None:
    vectors = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3).vectors
    inputs = {t: pool.inputs(t) for t in pool.tasks}
    first = symerge(pool.family, pool.pretrained, vectors, pool.heads, inputs, experts=pool.experts, steps=1,
                    batch_size=batch_size, seed=3, progress=False)
    task = pool.tasks[int(torch.randperm(len(pool.tasks), generator=torch.Generator().manual_seed(3))[0])]
    assert first.losses[0] == pytest.approx(_symerge_first_loss_by_hand(pool, task), rel=1e-4)
    res = symerge(pool.family, pool.pretrained, vectors, pool.heads, inputs, experts=pool.experts,
                  steps=4 * len(pool.tasks), batch_size=batch_size, lr=5e-2, seed=3, progress=False)
    c = res.coefficients.values()
    c = c.detach()
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
    assert not torch.allclose(c, torch.full_like(c, 0.3))  # it learned something
    assert all(np.isfinite(res.losses))


def test_symerge_through_pool(text_pool) -> None:
    _, _, pool = text_pool
    _check_symerge(pool, batch_size=16)


# ---------------------------------------------------------------------------------------------- CLIP
def test_zero_shot_head_by_hand(clip_pool) -> None:
    """w_k = normalise(mean_m normalise(P_text g(template_m(c_k)))) * exp(logit_scale), g = the text tower's
    pooled output, P_text its projection; and with one template the head's logits on an image equal CLIP's
    own logits_per_image (pretrained vision tower)."""
    from transformers import CLIPModel

    root, pool = clip_pool
    clip = CLIPModel.from_pretrained(str(root / "clip")).eval()
    tok = tiny_tokenizer()
    for task, names, templates in (("scenes", sorted(CLIP_CLASSES["scenes"]), ["a photo of a {}.", "the {} is good"]),
                                   ("objects", ["the bank", "music"], ["a {}"])):
        rows = []
        for name in names:
            enc = tok([t.replace("{}", name) for t in templates], padding=True, return_tensors="pt")
            with torch.no_grad():
                pooled = clip.text_model(**enc).pooler_output
                e = clip.text_projection(pooled)
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            rows.append(m / m.norm())
        expect = torch.stack(rows) * clip.logit_scale.exp()
        assert _rel(pool.heads[task].weight, expect) < 1e-5
    images = pool.data["objects"].inputs[:4]
    batch = pool.family.tokenize(images)
    enc = tok(["a the bank", "a music"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip(**enc, pixel_values=batch["pixel_values"]).logits_per_image
    assert _rel(pool.family.logits(batch, pool.heads["objects"], pool.pretrained), ref) < 1e-5


def test_clip_pool_static_se_merging_and_symerge(clip_pool) -> None:
    from transformers import CLIPVisionModelWithProjection

    root, pool = clip_pool
    assert pool.tasks == ["scenes", "objects"]
    assert pool.data["scenes"].label_names == sorted(CLIP_CLASSES["scenes"])  # sub-folders, sorted
    assert len(pool.data["scenes"]) == 9
    # the expert checkpoints have no projection: it is the pretrained one (zero task vector)
    assert torch.equal(pool.experts["scenes"]["visual_projection.weight"], pool.pretrained["visual_projection.weight"])
    plan = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3)
    merged = plan.apply(pool.pretrained)
    k = "vision_model.embeddings.patch_embedding.weight"
    v0 = pool.pretrained[k]
    assert torch.allclose(merged[k], v0 + 0.3 * ((pool.experts["scenes"][k] - v0) + (pool.experts["objects"][k] - v0)),
                          atol=1e-6)
    # merged body through the family == CLIPVisionModelWithProjection holding the merged weights
    from transformers import CLIPConfig

    top = CLIPConfig.from_pretrained(str(root / "clip"))
    vcfg = top.vision_config
    vcfg.projection_dim = top.projection_dim
    ref_model = CLIPVisionModelWithProjection(vcfg).eval()
    ref_model.load_state_dict(merged)
    batch = pool.family.tokenize(pool.data["scenes"].inputs)
    with torch.no_grad():
        z = ref_model(**batch).image_embeds
    z = z / z.norm(dim=-1, keepdim=True)
    assert _rel(pool.family.features(batch, merged), z) < 1e-5
    # SE-Merging: per-sample Conv2d patch embedding and class token, exact == materialised reference
    se = SEMerging(pool.family, pool.pretrained, plan, pool.experts, RouterConfig(layer=2, normalisation="relative"))
    exact, routing = se.features(batch, "exact")
    ref, _ = se.features(batch, "reference", routing=routing)
    assert _rel(exact, ref) < 1e-5
    assert not torch.allclose(routing.coefficients[0], routing.coefficients[1:].mean(0))  # per-sample indeed
    # the prototype paths: prototypes = mean merged probe representation per task; prototype-exact is the
    # exact forward under prototype routing, so it equals the reference under the same routing
    se_p = SEMerging(pool.family, pool.pretrained, plan, pool.experts, RouterConfig(layer=2))
    protos = se_p.calibrate({t: pool.inputs(t) for t in pool.tasks})
    expect_p = pool.family.probe(pool.family.tokenize(pool.inputs("objects")), se_p.static, [2])[2].mean(0)
    assert _rel(protos[1], expect_p) < 1e-5
    pe, routing_p = se_p.features(batch, "prototype-exact")
    assert _rel(pe, se_p.features(batch, "reference", routing=routing_p)[0]) < 1e-5
    feats, _ = se_p.features(batch, "fast")
    assert feats.shape == pe.shape and bool(torch.isfinite(feats).all())
    # single pass: blocks up to the probe layer run the static merge, the blocks above run sample b's
    # theta_b = theta_0 + sum_t C[b, t] tau_t with C routed at the probe layer (the route hook)
    sp, routing_s = se_p.features(batch, "single-pass")
    for b in range(len(sp)):
        full = se_p.stacked.merged(se_p.pretrained, routing_s.coefficients[b])
        theta = {k: full[k] if k in se_p._upper_keys else v for k, v in se_p.static.items()}
        one = pool.family.features({k: v[b:b + 1] for k, v in batch.items()}, theta)
        assert _rel(sp[b:b + 1], one) < 1e-5
    _check_symerge(pool, batch_size=16)
    # AdaMerging's first loss by hand: sum_t mean_x H(softmax(h_t(z(x; theta_0 + 0.3 sum tau)))), each task's
    # batch holding all its inputs (fewer than the batch size), H(p) = -sum_c p_c log p_c
    from mergelab.methods.adaptive import adamerging

    inputs = {t: pool.inputs(t) for t in pool.tasks}
    res = adamerging(pool.family, pool.pretrained, plan.vectors, pool.heads, inputs, steps=3, batch_size=16,
                     lr=0.05, progress=False)
    expect = 0.0
    for t in pool.tasks:
        with torch.no_grad():
            logp = torch.log_softmax(pool.heads[t](pool.family.features(pool.family.tokenize(inputs[t]), merged)), -1)
        expect += float(-(logp.exp() * logp).sum(-1).mean())
    assert res.losses[0] == pytest.approx(expect, rel=1e-4)
    c = res.coefficients.values().detach()
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0 and not torch.allclose(c, torch.full_like(c, 0.3))


# ---------------------------------------------------------------------------------------------- errors, config
def test_offline_hub_ids_fail_fast(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = PoolConfig(family="clip-vision", pretrained="openai/clip-vit-base-patch32",
                     experts={"mnist": "tanganke/clip-vit-base-patch32_mnist"})
    with pytest.raises(HubUnavailableError, match="openai/clip-vit-base-patch32.*hub is disabled"):
        load_pool(cfg)
    from mergelab.pools.data.loaders import load_task_data
    from mergelab.pools.pool import TaskDataConfig

    with pytest.raises(HubUnavailableError, match="pool.tasks.mnist: tanganke/mnist.*hub is disabled"):
        load_task_data("mnist", TaskDataConfig(path="tanganke/mnist", split="test"), "image")


def test_pool_config_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="factory"):
        PoolConfig(family="torch", pretrained="a", experts={"x": "b"})
    with pytest.raises(ValueError, match="family 'torch' only"):
        PoolConfig(family="clip-vision", pretrained="a", experts={"x": "b"}, head="fc")
    bad = _write_yaml(tmp_path / "p.yaml", {"family": "clip-vision", "pretrained": "x", "experts": {}})
    with pytest.raises(InputError, match="p.yaml: pool.experts"):
        load_pool_file(bad)
    assert PoolConfig(pretrained="a", experts={"x": "b"}).inputs() == ["a", "b"]


def test_wrong_expert_is_named(text_pool, tmp_path) -> None:
    arch, path, pool = text_pool
    cfg = pool.config.model_copy(update={"experts": {"senti": str(tmp_path / "missing")}, "tasks": {}})
    with pytest.raises(InputError, match="pool.experts.senti"):
        load_pool(cfg)


def test_half_precision_inference_only(text_pool) -> None:
    arch, path, pool = text_pool
    cfg = pool.config.model_copy(update={"dtype": "bfloat16", "tasks": {}})
    half = load_pool(cfg)
    batch = half.family.tokenize(TEXTS)
    with torch.no_grad():
        full = pool.family.logits(batch, pool.heads["topic"], pool.experts["topic"])
        low = half.family.logits(batch, half.heads["topic"], half.experts["topic"])
    assert _rel(low, full) < 0.05
    # SE-Merging's per-sample layers compute from the float32 theta_0 and task vectors
    plan = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3)
    cfg_r = RouterConfig(layer=1, normalisation="relative")
    f32, routing = SEMerging(pool.family, pool.pretrained, plan, pool.experts, cfg_r).features(batch, "exact")
    f16, _ = SEMerging(half.family, half.pretrained, plan, half.experts, cfg_r).features(batch, "exact", routing=routing)
    assert _rel(f16, f32) < 0.05
    vectors = make_plan("task_arithmetic", half.pretrained, half.experts, scaling=0.3).vectors
    with pytest.raises(InputError, match="inference only"):
        symerge(half.family, half.pretrained, vectors, half.heads, {t: TEXTS for t in half.tasks},
                experts=half.experts, steps=1, progress=False)


def test_yaml_round_trip_is_what_the_user_writes(text_pool) -> None:
    _, path, pool = text_pool
    raw = yaml.safe_load(path.read_text())["pool"]
    assert raw["family"] == "sequence-classification" and json.dumps(raw)
    assert pool.config.tasks["nli"].text_pair_field == "hypothesis"
    assert isinstance(pool.data["nli"].inputs[0], tuple)


# ---------------------------------------------------------------------------------------------- plain torch
class TinyNet(torch.nn.Module):
    """A residual MLP: ``inp``, a list of ``blocks``, a LayerNorm and the head ``fc``."""

    def __init__(self, d_in: int = 6, width: int = 8, n_blocks: int = 2, n_classes: int = 3) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(d_in, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(n_blocks))
        self.norm = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.fc(self.norm(h))


def tiny_net(**kwargs) -> TinyNet:
    return TinyNet(**kwargs)


@pytest.fixture(scope="module")
def torch_pool(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pool-torch")
    torch.manual_seed(0)
    pre = TinyNet()
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(root / "pre.safetensors"))
    g = torch.Generator().manual_seed(5)
    experts = {}
    for i, task in enumerate(("a", "b", "c")):
        net = TinyNet()
        net.load_state_dict(pre.state_dict())
        _perturb(net, seed=30 + i, scale=0.2)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / f"{task}.safetensors"))
        torch.save({"inputs": torch.randn(10, 6, generator=g), "labels": torch.randint(0, 3, (10,), generator=g)},
                   root / f"{task}.pt")
        experts[task] = net.eval()
    path = _write_yaml(root / "pool.yaml", {
        "family": "torch", "factory": "tests.test_families:tiny_net", "head": "fc", "layers": "blocks",
        "pretrained": "pre.safetensors", "device": "cpu",
        "experts": {t: f"{t}.safetensors" for t in experts}, "tasks": {t: {"path": f"{t}.pt"} for t in experts}})
    return experts, load_pool_file(path)


def test_torch_family_through_pool(torch_pool) -> None:
    nets, pool = torch_pool
    assert set(pool.pretrained) == {k for k in TinyNet().state_dict() if not k.startswith("fc.")}
    x = torch.stack(pool.inputs("a"))
    batch = pool.family.tokenize(pool.inputs("a"))
    for t, net in nets.items():  # expert body + expert head == the expert module
        with torch.no_grad():
            assert _rel(pool.family.logits(batch, pool.heads[t], pool.experts[t]), net(x)) < 1e-6
    plan = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3)
    merged = plan.apply(pool.pretrained)
    for k, v0 in pool.pretrained.items():
        assert torch.allclose(merged[k], v0 + 0.3 * sum(pool.experts[t][k] - v0 for t in pool.tasks), atol=1e-6)
    se = SEMerging(pool.family, pool.pretrained, plan, pool.experts, RouterConfig(layer=1, normalisation="relative"))
    exact, routing = se.features(batch, "exact")
    ref, _ = se.features(batch, "reference", routing=routing)
    assert _rel(exact, ref) < 1e-5
    _check_symerge(pool, batch_size=16)


def test_representation_probes_on_a_family_that_learns_its_width(torch_pool) -> None:
    """The torch family knows its probe width only after a forward (hidden_size -1): the probe analyses
    size their buffers from the first probe. Probes equal one family.probe call per model."""
    from mergelab.experiment.analysis.representations import collect_probes

    _, pool = torch_pool
    assert pool.family.hidden_size == -1 or pool.family.hidden_size == 8
    merged = make_plan("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3).apply(pool.pretrained)
    params = {"merged": merged, "pretrained": pool.pretrained, **pool.experts}
    inputs = {t: pool.inputs(t) for t in pool.tasks}
    probes = collect_probes(pool.family, params, inputs, batch_size=4)
    layers = list(range(pool.family.n_layers + 1))
    for name in ("merged", "b"):
        want = pool.family.probe(pool.family.tokenize([x for t in pool.tasks for x in inputs[t]]), params[name], layers)
        assert probes.reps[name].shape == (len(layers), 30, 8)
        for layer in layers:
            assert _rel(probes.reps[name][layer], want[layer]) < 1e-6
    empty = collect_probes(pool.family, params, {t: [] for t in pool.tasks})  # no text: empty, not a KeyError
    assert empty.reps["merged"].shape[:2] == (len(layers), 0)


def test_torch_family_errors(tmp_path, torch_pool) -> None:
    _, pool = torch_pool
    with pytest.raises(InputError, match="no callable 'nope'"):
        load_pool(pool.config.model_copy(update={"factory": "tests.test_families:nope"}))
    with pytest.raises(InputError, match="head 'head': no such module"):
        load_pool(pool.config.model_copy(update={"head": "head"}))


def _bench(config: Path, out: Path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    return CliRunner().invoke(app, ["--quiet", "bench", "--config", str(config), "--out", str(out)])


def _held_out_test(pool, n_val: int) -> dict:
    """Each task's examples after the first ``n_val`` (written out here, not with ModelPool.hold_out)."""
    return {t: d.subset(range(n_val, len(d))) for t, d in pool.data.items()}


def test_bench_config_on_tiny_torch_pool(torch_pool, tmp_path) -> None:
    """``mergelab bench --config`` on the tiny torch pool (what benchmarks/run_pool.py did): the Task
    Arithmetic row equals evaluate_tasks on the merge written out, over the examples after the two held
    out; the experts row is 1.0 normalised; results.json reads back through the schema; an offline hub id
    exits 2."""
    from mergelab.experiment.results import read_results
    from mergelab.pools.evaluate import evaluate_tasks

    _, pool = torch_pool
    cfg_path = tmp_path / "pool.yaml"
    raw = pool.config.model_dump(exclude_defaults=True)
    cfg_path.write_text(yaml.safe_dump({"pool": raw, "evaluation": {
        "rows": ["task_arithmetic_0.3", "se_prototype_task_arithmetic"], "validation_per_task": 2}}, sort_keys=False))
    result = _bench(cfg_path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    res = read_results(tmp_path / "run" / "results.json")
    merged = {k: v + 0.3 * sum(pool.experts[t][k] - v for t in pool.tasks) for k, v in pool.pretrained.items()}
    splits = _held_out_test(pool, 2)
    assert res.methods["task_arithmetic_0.3"].per_task == pytest.approx(evaluate_tasks(pool.family, merged, pool.heads,
                                                                                       splits))
    assert res.methods["individual"].normalized_average == pytest.approx(1.0)
    assert res.splits == {t: {"validation": 2, "test": 8} for t in pool.tasks}
    assert res.methods["se_prototype_task_arithmetic"].data == "calibration"
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    offline = tmp_path / "hub.yaml"
    offline.write_text(yaml.safe_dump({"pool": {"family": "sequence-classification", "pretrained": "gpt2",
                                                "experts": {"cola": "tanganke/gpt2_cola"},
                                                "tasks": {"cola": {"path": "nyu-mll/glue", "subset": "cola"}}},
                                       "evaluation": {"rows": ["task_arithmetic_0.3"]}}))
    import os

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        result = _bench(offline, tmp_path / "hub-run")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "gpt2" in result.output and "hub is disabled" in result.output
        assert not (tmp_path / "hub-run").exists()
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def test_adapt_and_analyze_config_on_tiny_torch_pool(torch_pool, tmp_path) -> None:
    """``adapt --config`` and ``analyze --config`` take the same pool config as ``bench --config``. With 0
    steps, AdaMerging's model is Task Arithmetic at its initial 0.3: its test accuracy equals that merge
    evaluated here on the examples after the held-out ones; the experts' accuracy is each expert's own."""
    from typer.testing import CliRunner

    from mergelab.cli import app
    from mergelab.pools.evaluate import evaluate_tasks

    _, pool = torch_pool
    cfg_path = tmp_path / "pool.yaml"
    cfg_path.write_text(yaml.safe_dump({"pool": pool.config.model_dump(exclude_defaults=True),
                                        "evaluation": {"validation_per_task": 3}}, sort_keys=False))
    r = CliRunner().invoke(app, ["--quiet", "adapt", "--config", str(cfg_path), "--method", "adamerging_taskwise",
                                 "--steps", "0", "--out", str(tmp_path / "adapt")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "adapt" / "result.json").read_text())
    test = _held_out_test(pool, 3)
    merged = {k: v + 0.3 * sum(pool.experts[t][k] - v for t in pool.tasks) for k, v in pool.pretrained.items()}
    assert res["benchmark"] == "pool" and res["per_task"] == pytest.approx(
        evaluate_tasks(pool.family, merged, pool.heads, test))
    assert res["expert_per_task"] == pytest.approx(evaluate_tasks(pool.family, lambda t: pool.experts[t], pool.heads,
                                                                  test))
    assert json.loads((tmp_path / "adapt" / "options.json").read_text())["options"]["config"] == str(cfg_path)
    r = CliRunner().invoke(app, ["--quiet", "analyze", "routing", "--config", str(cfg_path), "--layer", "1",
                                 "--n-per-task", "2", "--out", str(tmp_path / "short")])
    assert r.exit_code == 2 and "evaluation.validation_per_task" in r.output and not (tmp_path / "short").exists()
    g = torch.Generator().manual_seed(7)  # 40 examples per task: 32 calibration + 4 analysed are held out
    big = pool.config.model_dump(exclude_defaults=True)
    for t in pool.tasks:
        torch.save({"inputs": torch.randn(40, 6, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)},
                   tmp_path / f"{t}.pt")
        big["tasks"][t]["path"] = str(tmp_path / f"{t}.pt")
    big_path = tmp_path / "big.yaml"
    big_path.write_text(yaml.safe_dump({"pool": big, "evaluation": {"validation_per_task": 36}}))
    r = CliRunner().invoke(app, ["--quiet", "analyze", "routing", "--config", str(big_path), "--layer", "1",
                                 "--n-per-task", "4", "--out", str(tmp_path / "analysis")])
    assert r.exit_code == 0, r.output
    study = json.loads((tmp_path / "analysis" / "probe_study.json").read_text())
    assert study["tasks"] == pool.tasks and study["n_calib"] == 32  # the 4 analysed follow the 32 calibration ones
    assert sum(map(sum, study["routing"]["confusion"])) == 4 * len(pool.tasks)
    both = CliRunner().invoke(app, ["adapt", "--config", str(cfg_path), "-b", "reduced", "--method", "symerge",
                                    "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "drop --benchmark" in both.output and not (tmp_path / "x").exists()


def test_bench_config_on_tiny_clip_pool_with_a_saved_datasetdict(clip_pool, tmp_path) -> None:
    """The CLIP pool with each task's images in a saved ``datasets.DatasetDict`` (the hub configs' path):
    ``bench --config`` gives, per row, the accuracy computed here without the runner: each expert with its
    zero-shot head (``individual``), the Task Arithmetic merge (``task_arithmetic_0.3``), and the searched
    row's validation scores on the held-out images, its test score at the chosen scaling."""
    import datasets

    from mergelab import methods
    from mergelab.experiment.results import read_results
    from mergelab.pools.data.tasks import LazyColumn
    from mergelab.pools.evaluate import evaluate_tasks

    root, folder_pool = clip_pool
    tasks = {}
    for task in CLIP_CLASSES:
        images = list(folder_pool.data[task].inputs)
        labels = list(folder_pool.data[task].labels)
        names = folder_pool.data[task].label_names
        feats = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=names)})
        ds = datasets.Dataset.from_dict({"img": images, "y": labels}, features=feats)
        datasets.DatasetDict({"train": ds.select(range(2)), "test": ds}).save_to_disk(str(tmp_path / f"{task}_ds"))
        tasks[task] = {"path": f"{task}_ds", "split": "test", "image_field": "img", "label_field": "y"}
    tasks["objects"].update(class_names=["the bank", "music"], templates=["a {}"])
    pool_cfg = {"family": "clip-vision", "pretrained": str(root / "clip"), "device": "cpu",
                "experts": {t: str(root / f"expert_{t}") for t in CLIP_CLASSES},
                "templates": ["a photo of a {}.", "the {} is good"], "tasks": tasks}
    cfg_path = tmp_path / "clip.yaml"
    cfg_path.write_text(yaml.safe_dump({"pool": pool_cfg, "evaluation": {
        "rows": ["task_arithmetic_0.3", "task_arithmetic"], "validation_per_task": 3, "lambdas": [0.3, 1.0]}}))
    result = _bench(cfg_path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    res = read_results(tmp_path / "run" / "results.json")
    pool = load_pool_file(cfg_path)
    assert isinstance(pool.data["scenes"].inputs, LazyColumn) and len(pool.data["scenes"]) == 9
    assert pool.data["scenes"].label_names == folder_pool.data["scenes"].label_names
    test = _held_out_test(pool, 3)
    val = {t: d.subset(range(3)) for t, d in pool.data.items()}
    experts = evaluate_tasks(pool.family, lambda t: pool.experts[t], pool.heads, test)
    assert res.methods["individual"].per_task == pytest.approx(experts)
    ta = methods.merge("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3)
    assert res.methods["task_arithmetic_0.3"].per_task == pytest.approx(evaluate_tasks(pool.family, ta, pool.heads,
                                                                                        test))
    searched = res.methods["task_arithmetic"]
    scores = [float(np.mean(list(evaluate_tasks(pool.family, methods.merge("task_arithmetic", pool.pretrained,
                                                                            pool.experts, scaling=lam),
                                                  pool.heads, val).values()))) for lam in (0.3, 1.0)]
    assert searched.validation["average"] == pytest.approx([round(v, 4) for v in scores], abs=1e-4)
    best = (0.3, 1.0)[int(np.argmax(scores))]
    assert searched.params["scaling"] == best
    assert searched.per_task == pytest.approx(evaluate_tasks(
        pool.family, methods.merge("task_arithmetic", pool.pretrained, pool.experts, scaling=best), pool.heads, test))



def test_bench_config_lazy_datasets_equal_image_folders(clip_pool, tmp_path) -> None:
    """The dynamic and adaptive rows read a lazily decoded DatasetDict column the same as images held in
    memory: the same images saved as image folders and as saved DatasetDicts (PNG, lossless) give the
    same numbers for every row, row by row."""
    import datasets

    from mergelab.experiment.results import read_results

    root, folder_pool = clip_pool
    evaluation = {"rows": ["se_merging_task_arithmetic", "se_prototype_task_arithmetic", "adamerging_layerwise"],
                  "validation_per_task": 2, "steps": {"adamerging_layerwise": 2}}
    folder_cfg = folder_pool.config.model_dump(exclude_defaults=True)
    ds_cfg = yaml.safe_load(yaml.safe_dump(folder_cfg))
    for task in CLIP_CLASSES:
        d = folder_pool.data[task]
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=d.label_names)})
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": list(d.inputs), "label": list(d.labels)},
                                                                 features=feats)}).save_to_disk(str(tmp_path / task))
        ds_cfg["tasks"][task]["path"] = str(tmp_path / task)
    runs = {}
    for name, pool_cfg in (("folders", folder_cfg), ("datasets", ds_cfg)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"pool": pool_cfg, "evaluation": evaluation}))
        result = _bench(path, tmp_path / f"run-{name}")
        assert result.exit_code == 0, result.output
        runs[name] = read_results(tmp_path / f"run-{name}" / "results.json")
    assert set(runs["datasets"].methods) == {"individual", "pretrained", *evaluation["rows"]}
    for row, r in runs["folders"].methods.items():
        assert runs["datasets"].methods[row].per_task == pytest.approx(r.per_task), row
    assert runs["datasets"].methods["se_merging_task_arithmetic"].routing is not None


def test_bench_config_on_tiny_gpt2_pool(tmp_path) -> None:
    """A GPT-2 sequence-classification pool (texts and text pairs from CSV files) through ``bench --config``:
    the experts row equals each expert's own Hugging Face model scored here, the static rows equal their
    merges evaluated directly, and the same config run twice gives the same numbers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mergelab import methods
    from mergelab.experiment.results import read_results
    from mergelab.pools.evaluate import evaluate_tasks

    path = _seqcls_pool(tmp_path, "gpt2")
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"rows": ["average", "task_arithmetic_0.3"], "validation_per_task": 1}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = _bench(path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    res = read_results(tmp_path / "run" / "results.json")
    pool = load_pool_file(path)
    test = _held_out_test(pool, 1)
    for task, data in test.items():  # the expert's own model, outside mergelab's families
        d = tmp_path / f"expert_{task}"
        model = AutoModelForSequenceClassification.from_pretrained(str(d)).eval()
        tok = AutoTokenizer.from_pretrained(str(d))
        correct = 0
        for x, y in zip(data.inputs, data.labels, strict=True):
            enc = tok(*x, return_tensors="pt") if isinstance(x, tuple) else tok(x, return_tensors="pt")
            with torch.no_grad():
                correct += int(model(**enc).logits.argmax(-1).item() == y)
        assert res.methods["individual"].per_task[task] == pytest.approx(correct / len(data))
    for row, method, params in (("average", "average", {}), ("task_arithmetic_0.3", "task_arithmetic", {"scaling": 0.3})):
        merged = methods.merge(method, pool.pretrained, pool.experts, **params)
        assert res.methods[row].per_task == pytest.approx(evaluate_tasks(pool.family, merged, pool.heads, test))
    again = _bench(path, tmp_path / "run2")
    assert again.exit_code == 0, again.output
    res2 = read_results(tmp_path / "run2" / "results.json")
    assert {r: m.per_task for r, m in res2.methods.items()} == {r: m.per_task for r, m in res.methods.items()}


# ---------------------------------------------------------------------------------------------- pieces
def test_per_sample_conv2d_matches_per_sample_conv() -> None:
    """y_b = conv2d(x_b, W_0 + sum_t C[b,t] dW_t, b_0 + sum_t C[b,t] db_t) for each sample, with stride,
    padding and bias (the grouped convolution against one convolution per sample)."""
    import torch.nn.functional as F

    from mergelab.core.functional import StackedVectors, per_sample_mixing, run_with

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1))
    pre = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    vecs = {t: {k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in ("a", "b")}
    stacked = StackedVectors.from_vectors(vecs)
    x = torch.randn(5, 3, 9, 9, generator=g)
    c = torch.rand(5, 2, generator=g)
    with torch.no_grad(), per_sample_mixing(conv, pre, stacked, c):
        got = run_with(conv, pre, x)
    for b in range(5):
        w = pre["0.weight"] + c[b, 0] * vecs["a"]["0.weight"] + c[b, 1] * vecs["b"]["0.weight"]
        bias = pre["0.bias"] + c[b, 0] * vecs["a"]["0.bias"] + c[b, 1] * vecs["b"]["0.bias"]
        assert _rel(got[b:b + 1], F.conv2d(x[b:b + 1], w, bias, stride=2, padding=1)) < 1e-5


def test_task_data_files(tmp_path) -> None:
    from mergelab.pools.data.loaders import load_task_data
    from mergelab.pools.pool import TaskDataConfig

    _write_csv(tmp_path / "t.csv", [("good film", "pos"), ("bad film", "neg"), ("great", "pos")], ("text", "label"))
    d = load_task_data("t", TaskDataConfig(path=str(tmp_path / "t.csv")), "text")
    assert d.label_names == ["neg", "pos"] and d.labels == [1, 0, 1] and d.inputs[0] == "good film"
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"q": f"q{i}", "s": f"s{i}", "y": i % 2}) for i in range(4)))
    cfg = TaskDataConfig(path=str(tmp_path / "p.jsonl"), text_field="q", text_pair_field="s", label_field="y", limit=3)
    d = load_task_data("p", cfg, "text")
    assert d.inputs == [("q0", "s0"), ("q1", "s1"), ("q2", "s2")] and d.labels == [0, 1, 0]
    with pytest.raises(InputError, match=r"pool.tasks.p: .*p\.jsonl: line 1: field 'text' is missing"):
        load_task_data("p", TaskDataConfig(path=str(tmp_path / "p.jsonl")), "text")
    with pytest.raises(InputError, match="no such file"):
        load_task_data("p", TaskDataConfig(path=str(tmp_path / "missing.csv")), "text")


def test_text_family_pool_with_cached_heads(tmp_path) -> None:
    """Family 'text': encoder bodies; a head.safetensors next to an expert's weights is its head."""
    from safetensors.torch import save_file

    from tests.tiny_models import save_tiny_bert

    base = save_tiny_bert(tmp_path / "base")
    e1 = save_tiny_bert(tmp_path / "e1", seed=1, perturb=0.05, base=base)
    e2 = save_tiny_bert(tmp_path / "e2", seed=2, perturb=0.05, base=base)
    w, b = torch.randn(3, 32), torch.randn(3)
    save_file({"weight": w, "bias": b}, str(e1 / "head.safetensors"))
    path = _write_yaml(tmp_path / "pool.yaml", {"family": "text", "pretrained": "base", "device": "cpu",
                                                "experts": {"one": "e1", "two": "e2"}})
    pool = load_pool_file(path)
    from mergelab.core.io import load_state_dict

    assert all(torch.equal(pool.experts["two"][k], v) for k, v in load_state_dict(str(e2)).items())
    assert set(pool.heads) == {"one"} and torch.equal(pool.heads["one"].weight, w)
    batch = pool.family.tokenize(TEXTS[:2])
    feats = pool.family.features(batch, pool.experts["one"])
    assert torch.allclose(pool.family.logits(batch, pool.heads["one"], pool.experts["one"]), feats @ w.T + b, atol=1e-5)


def test_lazy_column_reads_items_on_demand() -> None:
    """Image columns of a datasets.Dataset are read per item; slices stay lazy; batching does not read
    every item to sort it (a fake dataset counts the reads)."""
    from mergelab.core.batching import iter_batches
    from mergelab.pools.data.tasks import LazyColumn

    class Fake:
        reads = 0

        def __len__(self):
            return 10

        def __getitem__(self, i):
            Fake.reads += 1
            return {"image": f"img{i}", "label": i % 2}

    col = LazyColumn(Fake(), "image", range(8))
    assert len(col) == 8 and Fake.reads == 0
    part = col[2:6]
    assert isinstance(part, LazyColumn) and len(part) == 4 and Fake.reads == 0
    assert part[1] == "img3" and list(part) == ["img2", "img3", "img4", "img5"]
    before = Fake.reads
    assert [b for b in iter_batches(col, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert Fake.reads == before
