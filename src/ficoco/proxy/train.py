"""Training the proxy model (issue 4): next-token loss on the answer plus a global [CLS] objective.

The [CLS] token must carry meaning for FiCoCo-V's semantic term and for EViT, so besides the
answer loss an auxiliary linear head on the vision tower's pooled [CLS] output predicts what the
scene contains (a multi-label target supplied by the dataset), as CLIP's contrastive loss trains
[CLS] in the real model. Only the LLaVA model is saved; the head is training-only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..prompts import chat_prompt


class QASample(Protocol):
    """What training and evaluation need from a dataset sample."""

    image: object  # PIL.Image
    question: str
    answer: str
    family: str


@dataclass
class TrainConfig:
    """Recipe. Defaults aim at < 10 minutes on one H100."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    aux_weight: float = 0.5
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cuda"
    dtype: str = "bfloat16"  # autocast dtype on CUDA; float32 on CPU
    num_workers: int = 8
    log_every: int = 50


def collate(samples: Sequence[QASample], processor, with_answers: bool = True) -> dict[str, Tensor]:
    """Right-padded batch. With answers: the answer tokens and ``</s>`` are appended and are the
    only positions with labels; without: prompts only (for generation, left-padded)."""
    tokenizer = processor.tokenizer
    images = [s.image for s in samples]
    prompts = [chat_prompt(processor, s.question) for s in samples]
    if not with_answers:
        tokenizer.padding_side = "left"
        return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    encoded = processor(images=images, text=prompts, return_tensors=None, padding=False)
    rows, labels = [], []
    for ids, sample in zip(encoded["input_ids"], samples):
        answer = tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(list(ids) + answer)
        labels.append([-100] * len(ids) + answer)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels]),
        "pixel_values": torch.as_tensor(encoded["pixel_values"] if isinstance(encoded["pixel_values"], Tensor)
                                        else torch.stack([torch.as_tensor(p) for p in encoded["pixel_values"]])),
    }


class ClsHead(nn.Module):
    """Linear multi-label head on the pooled [CLS] output of the vision tower."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)


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
    aux_targets: Callable[[QASample], Sequence[float]] | None = None,
    num_aux: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``model`` (a ``LlavaForConditionalGeneration``) in place on samples ``sample_at(i)``.

    Returns the loss curve and timing. Data loading uses a ``DataLoader`` over sample indices, so
    sample ``i`` is the same whatever the number of workers.
    """
    from torch.utils.data import DataLoader

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device).train()
    head = ClsHead(model.config.vision_config.hidden_size, num_aux).to(device) if aux_targets and num_aux else None
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    pooled: dict[str, Tensor] = {}
    hook = model.model.vision_tower.register_forward_hook(
        lambda module, args, output: pooled.__setitem__("cls", output.pooler_output))

    def make_batch(indices: list[int]) -> tuple[dict, Tensor | None]:
        samples = [sample_at(i) for i in indices]
        batch = collate(samples, processor)
        aux = torch.tensor([list(aux_targets(s)) for s in samples], dtype=torch.float32) if head is not None else None
        return batch, aux

    loader = DataLoader(range(config.steps * config.batch_size), batch_size=config.batch_size, shuffle=False,
                        num_workers=config.num_workers, collate_fn=make_batch,
                        persistent_workers=config.num_workers > 0)
    use_autocast = device.type == "cuda"
    autocast_dtype = getattr(torch, config.dtype)
    curve, started = [], time.time()
    try:
        for step, (batch, aux) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * cosine_lr(step, config)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                out = model(**batch)
                loss = out.loss
                aux_loss = torch.zeros((), device=device)
                if head is not None:
                    logits = head(pooled["cls"].float())
                    aux_loss = nn.functional.binary_cross_entropy_with_logits(logits, aux.to(device))
                    loss = loss + config.aux_weight * aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if step % config.log_every == 0 or step == config.steps - 1:
                entry = dict(step=step, loss=float(out.loss.detach()), aux_loss=float(aux_loss.detach()),
                             lr=optimizer.param_groups[0]["lr"], seconds=time.time() - started)
                curve.append(entry)
                log(f"step {step:5d}  answer loss {entry['loss']:.4f}  cls loss {entry['aux_loss']:.4f}  "
                    f"lr {entry['lr']:.2e}  {entry['seconds']:.0f}s")
    finally:
        hook.remove()
    model.eval()
    return {"config": asdict(config), "curve": curve, "seconds": time.time() - started}
