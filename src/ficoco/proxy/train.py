"""Training the proxy model (issue 4): next-token loss on the answer plus a global [CLS] objective.

The [CLS] token must carry meaning for FiCoCo-V's semantic term and for EViT, so besides the
answer loss an auxiliary linear head on the vision tower's pooled [CLS] output predicts what the
scene contains (a multi-label target supplied by the dataset), as CLIP's contrastive loss trains
[CLS] in the real model. Optional terms (``TrainConfig``): the same head at inner layers, a
saliency loss on where [CLS] attends in the reducing layers, and steps whose LLM sees a random,
renumbered subset of the visual tokens. Only the LLaVA model is saved; the heads are training-only.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..adapters import attach
from ..methods.baselines import random_drop
from ..prompts import chat_prompt, follow_up_prompt


class QASample(Protocol):
    """What training and evaluation need from a dataset sample."""

    image: object  # PIL.Image
    question: str
    answer: str
    family: str


@dataclass
class TrainConfig:
    """Recipe. Defaults aim at < 10 minutes on one H100 (docs/proxy-model.md)."""

    steps: int = 1800
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    aux_weight: float = 0.5
    # encoder layers (0-based) whose [CLS] also predicts the scene, each through its own
    # LayerNorm + linear head: [CLS] must summarise every object already in the layers where
    # FiCoCo-V and EViT read its attention (12-22), not only at the output
    cls_layers: tuple[int, ...] = ()
    # encoder layers (0-based) whose [CLS] attention must reach every object and word patch:
    # ``-mean log a_i`` over those patches of the head-averaged attention ``a`` from [CLS]
    # (docs/proxy-model.md: without it the proxy's [CLS] reads background patches, unlike CLIP's)
    cls_attention_layers: tuple[int, ...] = ()
    cls_attention_weight: float = 0.1
    patch_weight: float = 0.5
    # share of steps whose batch reaches the LLM with a random subset of ``token_drop_min`` to
    # all-but-one of the visual tokens, renumbered as encoder-side reductions renumber them: a
    # proxy trained on the full raster only learns to read the layout from the sequence index
    # and then fails any encoder-side reduction (docs/proxy-model.md), unlike LLaVA
    token_drop_prob: float = 0.0
    token_drop_min: int = 32
    # the same for a model whose images differ in token count (the Qwen proxy): the LLM sees a
    # random share in [token_drop_min_share, 1) of each image's tokens
    token_drop_min_share: float = 0.1
    # the Qwen proxy: weight of the distillation of its LLM visual tokens towards a LLaVA proxy's
    # image tokens over the same scene region (ficoco.proxy.qwen.teacher_targets); 0: off
    distill_weight: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cuda"
    dtype: str = "bfloat16"  # autocast dtype on CUDA; float32 on CPU
    num_workers: int = field(default_factory=lambda: max(0, min(14, (os.cpu_count() or 1) - 2)))
    log_every: int = 50
    max_seconds: float | None = None  # stop early (and record it) once training has run this long


#: processor outputs with one entry per prompt token, extended with zeros over the appended text
_PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")


def collate(samples: Sequence[QASample], processor, with_answers: bool = True,
            encode: Callable[[list, list[str]], dict] | None = None) -> dict[str, Tensor]:
    """Right-padded batch of any image processor's outputs (LLaVA's ``pixel_values [B, 3, H, W]``,
    Qwen-VL's packed patches and ``image_grid_thw``). With answers: the answer tokens and ``</s>``
    are appended and are the only positions with labels, followed by the (question, answer) pairs
    of a sample's optional ``turns`` as later turns of the conversation; without: first prompts only
    (for generation, left-padded). ``encode(images, prompts)`` stands in for the processor call
    (e.g. :func:`ficoco.proxy.qwen.fast_encoder`'s)."""
    tokenizer = processor.tokenizer
    images = [s.image for s in samples]
    prompts = [chat_prompt(processor, s.question) for s in samples]
    tokenizer.padding_side = "right" if with_answers else "left"
    encoded = dict(encode(images, prompts) if encode is not None
                   else processor(images=images, text=prompts, return_tensors="pt", padding=True))
    if not with_answers:
        return encoded
    real = encoded.pop("attention_mask").bool()
    prompt_ids = [ids[keep].tolist() for ids, keep in zip(encoded.pop("input_ids"), real)]
    per_token = {k: [row[keep].tolist() for row, keep in zip(encoded.pop(k), real)]
                 for k in _PER_TOKEN_KEYS if k in encoded}
    conversations = [[(s.question, s.answer), *getattr(s, "turns", ())] for s in samples]
    # one template rendering and two batched tokenizer calls per batch, not per turn
    sentinel = "\x00question\x00"
    template = follow_up_prompt(processor, sentinel)
    follow_ups = [template.replace(sentinel, q) for turns in conversations for q, _ in turns[1:]]
    follow_up_ids = iter(tokenizer(follow_ups, add_special_tokens=False)["input_ids"] if follow_ups else [])
    answer_ids = iter(tokenizer([a for turns in conversations for _, a in turns], add_special_tokens=False)["input_ids"])
    rows, labels = [], []
    for ids, turns in zip(prompt_ids, conversations):
        row, label = list(ids), [-100] * len(ids)
        for turn in range(len(turns)):
            if turn:
                prompt = next(follow_up_ids)
                row, label = row + prompt, label + [-100] * len(prompt)
            answer = next(answer_ids) + [tokenizer.eos_token_id]
            row, label = row + answer, label + answer
        rows.append(row)
        labels.append(label)
    length = max(len(r) for r in rows)

    def padded(values: list[list[int]], fill: int) -> Tensor:
        return torch.tensor([v + [fill] * (length - len(v)) for v in values])

    return {
        "input_ids": padded(rows, tokenizer.pad_token_id),
        "attention_mask": padded([[1] * len(r) for r in rows], 0),
        "labels": padded(labels, -100),
        **{k: padded(values, 0) for k, values in per_token.items()},
        **encoded,  # pixels and per-image entries, untouched
    }


class ClsHead(nn.Module):
    """Linear multi-label head on the pooled [CLS] output of the vision tower, optionally after a
    LayerNorm (for the [CLS] state of an inner layer, which the tower's post-LayerNorm never sees)."""

    def __init__(self, hidden: int, num_labels: int, normalize: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden) if normalize else nn.Identity()
        self.proj = nn.Linear(hidden, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(self.norm(pooled))


def masked_multilabel_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of ``logits [B, L]`` against ``targets [B, L]`` averaged over the rows
    whose targets are not NaN (0 when there is none)."""
    known = ~targets.isnan().any(dim=-1)
    per_row = nn.functional.binary_cross_entropy_with_logits(
        logits, targets.nan_to_num(0.0), reduction="none").mean(dim=-1)
    return (per_row * known).sum() / known.sum().clamp(min=1)


def word_alignment_loss(image_tokens: Tensor, word_embeddings: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of image tokens ``[B, P, D]`` scored against word embeddings ``[V, D]``
    (logits ``[B, P, V]``) with targets ``[B, P, K]`` word ids (-100 = none): each patch spreads its
    target probability evenly over its words; patches without words are skipped."""
    logp = torch.log_softmax(image_tokens @ word_embeddings.T, dim=-1)
    valid = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)) * valid
    words_per_patch = valid.sum(-1)
    per_patch = -picked.sum(-1) / words_per_patch.clamp(min=1)
    has_words = words_per_patch > 0
    return (per_patch * has_words).sum() / has_words.sum().clamp(min=1)


def cls_attention_saliency_loss(cls_query: Tensor, keys: Tensor, num_heads: int, scale: float,
                                salient: Tensor) -> Tensor:
    """``-mean_{i salient} log a_i`` with ``a`` ``[B, N]`` the head-averaged attention of the [CLS]
    query ``[B, E]`` over the layer's keys ``[B, 1 + N, E]`` ([CLS] first), kept at the ``N``
    patches; ``salient`` ``[B, N]`` bool marks the patches that must be attended. Averaged over the
    rows that have a salient patch (0 when none). A log per patch, not the log of the summed mass,
    so that no object patch may be ignored while others take the attention."""
    b, length, width = keys.shape
    head_dim = width // num_heads
    logits = torch.einsum("bhd,blhd->bhl", cls_query.view(b, num_heads, head_dim),
                          keys.view(b, length, num_heads, head_dim)).float() * scale
    patches = torch.softmax(logits, dim=-1).mean(dim=1)[:, 1:]
    log_attention = patches.clamp(min=1e-12).log()
    per_row = -(log_attention * salient).sum(-1) / salient.sum(-1).clamp(min=1)
    has_salient = salient.any(-1)
    return (per_row * has_salient).sum() / has_salient.sum().clamp(min=1)


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer, params: list, config: TrainConfig,
                   started: float) -> tuple[float, bool]:
    """Backward, clip, step; returns the seconds since ``started`` and whether that is over
    ``config.max_seconds``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    elapsed = time.time() - started
    return elapsed, config.max_seconds is not None and elapsed > config.max_seconds


def cosine_lr(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: nn.Module,
    processor,
    sample_at: Callable[[int], QASample],
    config: TrainConfig,
    aux_targets: Callable[[QASample], Sequence[float] | None] | None = None,
    num_aux: int = 0,
    patch_words: Callable[[QASample], Sequence[Sequence[str]] | None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``model`` (a ``LlavaForConditionalGeneration``) in place on samples ``sample_at(i)``.

    Two optional training-only objectives shape the vision side. ``aux_targets(sample)`` gives the
    ``[num_aux]`` multi-hot scene description a linear head predicts from the pooled [CLS].
    ``patch_words(sample)`` gives, for every patch, the words that describe it (e.g. ``("red",
    "circle")``; empty for background): each projected image token, scored against the LLM's
    input word embeddings, must put its probability on those words (LLaVA's stage-1 alignment of
    image tokens to the word-embedding space, made dense). Either may return ``None`` for a sample
    it does not describe. ``patch_words`` also marks the patches that ``config.cls_attention_layers``
    make [CLS] attend to (:func:`cls_attention_saliency_loss`).
    Returns the loss curve and timing. Data loading uses a ``DataLoader`` over sample indices, so
    sample ``i`` is the same whatever the number of workers.
    """
    from torch.utils.data import DataLoader

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device).train()
    num_layers = model.config.vision_config.num_hidden_layers
    grid_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    if not 0.0 <= config.token_drop_prob <= 1.0:
        raise ValueError(f"token_drop_prob must lie in [0, 1], got {config.token_drop_prob}")
    if config.token_drop_prob > 0 and not 1 <= config.token_drop_min < grid_patches:
        raise ValueError(f"token_drop_min must lie in 1..{grid_patches - 1}, got {config.token_drop_min}")
    for name in ("cls_layers", "cls_attention_layers"):
        if any(not 0 <= layer < num_layers for layer in getattr(config, name)):
            raise ValueError(f"{name} {getattr(config, name)} must lie in 0..{num_layers - 1}")
    if config.cls_attention_layers and patch_words is None:
        raise ValueError("cls_attention_layers needs patch_words: they say which patches [CLS] must attend to")
    hidden = model.config.vision_config.hidden_size
    cls_head = ClsHead(hidden, num_aux).to(device) if aux_targets and num_aux else None
    depth_heads = nn.ModuleDict({str(layer): ClsHead(hidden, num_aux, normalize=True) for layer in config.cls_layers}
                                if cls_head is not None else {}).to(device)
    params = (list(model.parameters()) + (list(cls_head.parameters()) if cls_head is not None else [])
              + list(depth_heads.parameters()))
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    # read the tower's outputs inside the hook: LLaVA later overwrites ``pooler_output`` with its
    # projected image features (transformers >= 5.2x)
    tower_out: dict[str, object] = {}
    hooks = [
        model.model.vision_tower.register_forward_hook(
            lambda module, args, output: tower_out.update(pooled=output.pooler_output)),
        model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: tower_out.update(projected=output)),
    ]
    encoder_layers = model.model.vision_tower.encoder.layers
    for layer in map(int, depth_heads):  # the [CLS] row of each named layer's output
        hooks.append(encoder_layers[layer].register_forward_hook(
            lambda module, args, output, key=f"cls{layer}": tower_out.update(
                {key: (output[0] if isinstance(output, tuple) else output)[:, 0]})))
    # the [CLS] query and all keys of each saliency layer, read at the projections (the layer's own
    # attention runs through SDPA and keeps no map)
    for layer in config.cls_attention_layers:
        attention = encoder_layers[layer].self_attn
        hooks.append(attention.q_proj.register_forward_hook(
            lambda module, args, output, key=f"q{layer}": tower_out.update({key: output[:, 0]})))
        hooks.append(attention.k_proj.register_forward_hook(
            lambda module, args, output, key=f"k{layer}": tower_out.update({key: output})))
    vocab = processor.tokenizer.get_vocab()  # word -> id, looked up once rather than per patch
    unknown = processor.tokenizer.unk_token_id

    def make_batch(indices: list[int]) -> tuple[dict, Tensor | None, Tensor | None]:
        samples = [sample_at(i) for i in indices]
        batch = collate(samples, processor)
        aux = patches = None
        if cls_head is not None:  # rows without a scene description get NaN targets, masked out
            targets = [aux_targets(s) for s in samples]
            aux = torch.tensor([list(t) if t is not None else [math.nan] * num_aux for t in targets])
        if patch_words is not None:  # [B, P, 2] word ids per patch, -100 where none
            grids = [patch_words(s) for s in samples]
            num_patches = next((len(g) for g in grids if g is not None), 1)
            ids = [[([vocab.get(w, unknown) for w in words[:2]] + [-100, -100])[:2] for words in grid] if grid is not None
                    else [[-100, -100]] * num_patches for grid in grids]
            patches = torch.tensor(ids)
        return batch, aux, patches

    loader = DataLoader(range(config.steps * config.batch_size), batch_size=config.batch_size, shuffle=False,
                        num_workers=config.num_workers, collate_fn=make_batch, pin_memory=device.type == "cuda",
                        persistent_workers=config.num_workers > 0)
    # its own generator: the drop draws do not move the model's or the data's random streams
    drop_draws = torch.Generator().manual_seed(config.seed)
    use_autocast = device.type == "cuda"
    autocast_dtype = getattr(torch, config.dtype)
    curve, started = [], time.time()
    stopped_at = None
    try:
        for step, (batch, aux, patches) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * cosine_lr(step, config)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if patches is not None:
                patches = patches.to(device, non_blocking=True)
            dropping = (config.token_drop_prob > 0
                        and float(torch.rand((), generator=drop_draws)) < config.token_drop_prob)
            kept_tokens = (int(torch.randint(config.token_drop_min, grid_patches, (), generator=drop_draws))
                           if dropping else grid_patches)
            # the drop runs through ficoco's own adapter (random dropping at the feature layer), which
            # cuts placeholders, labels and masks alike; hooks are only needed for the forward pass
            with (attach(model, random_drop(kept_tokens, seed=step)) if dropping
                  else contextlib.nullcontext()) as handle:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                    out = model(**batch)
                word_targets = patches
                if handle is not None and patches is not None:  # the LLM got the surviving patches only
                    positions = handle.vision_trace.positions
                    word_targets = patches.gather(1, positions[..., None].expand(-1, -1, patches.shape[-1]))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                loss = out.loss
                aux_loss = patch_loss = attention_loss = torch.zeros((), device=device)
                if cls_head is not None:
                    aux = aux.to(device)
                    aux_loss = masked_multilabel_loss(cls_head(tower_out["pooled"].float()), aux)
                    if depth_heads:
                        inner = [masked_multilabel_loss(head(tower_out[f"cls{layer}"].float()), aux)
                                 for layer, head in depth_heads.items()]
                        aux_loss = (aux_loss + sum(inner)) / (1 + len(inner))
                    loss = loss + config.aux_weight * aux_loss
                if patches is not None:
                    embeddings = model.get_input_embeddings().weight
                    patch_loss = word_alignment_loss(tower_out["projected"].float(), embeddings.float(),
                                                     word_targets)
                    loss = loss + config.patch_weight * patch_loss
                if config.cls_attention_layers:
                    salient = patches[..., 0] != -100
                    attention_loss = sum(
                        cls_attention_saliency_loss(tower_out[f"q{layer}"], tower_out[f"k{layer}"],
                                                    encoder_layers[layer].self_attn.num_heads,
                                                    encoder_layers[layer].self_attn.scale, salient)
                        for layer in config.cls_attention_layers) / len(config.cls_attention_layers)
                    loss = loss + config.cls_attention_weight * attention_loss
            elapsed, out_of_time = optimizer_step(loss, optimizer, params, config, started)
            if step % config.log_every == 0 or step == config.steps - 1 or out_of_time:
                entry = dict(step=step, loss=float(out.loss.detach()), aux_loss=float(aux_loss.detach()),
                             patch_loss=float(patch_loss.detach()), attention_loss=float(attention_loss.detach()),
                             visual_tokens=kept_tokens, lr=optimizer.param_groups[0]["lr"], seconds=elapsed)
                curve.append(entry)
                log(f"step {step:5d}  answer loss {entry['loss']:.4f}  cls loss {entry['aux_loss']:.4f}  "
                    f"patch loss {entry['patch_loss']:.4f}  attention loss {entry['attention_loss']:.3f}  "
                    f"lr {entry['lr']:.2e}  {elapsed:.0f}s")
            if out_of_time:  # a safety net for a fixed wall-clock budget; the record says so
                stopped_at = step
                log(f"stopped after {elapsed:.0f}s at step {step} of {config.steps} (max_seconds)")
                break
    finally:
        for hook in hooks:
            hook.remove()
    model.eval()
    return {"config": asdict(config), "curve": curve, "seconds": time.time() - started, "stopped_at_step": stopped_at}
