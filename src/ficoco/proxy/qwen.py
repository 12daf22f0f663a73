"""The Qwen2.5-VL-architecture proxy model (issue 14): architecture, data at varied resolutions,
training and the saved checkpoint.

A Hugging Face ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL's geometry at small width:
14-pixel patches, 2x2 merging into LLM tokens, 112-pixel attention windows with four
full-attention blocks (every sixth of 24), no [CLS], M-RoPE in the decoder. It reads the same
procedural scenes as the LLaVA proxy, each resized to its own size (seeded by the sample, so a
batch mixes 81 to 256 visual tokens per image), and the same closed question language; its
decoder starts from the LLaVA proxy's (the same words, widths and depth), its vision tower and
merger from scratch.

Training: the answer loss over multi-turn conversations, the dense word-alignment loss of each
LLM visual token against the decoder's input word embeddings (the merged token's words: the
object or written word under its centre), and steps whose LLM sees a random subset of each
image's tokens, dropped through ficoco's own Qwen-VL adapter (kept tokens keep their M-RoPE
positions, as every encoder-side method keeps them).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

from ..adapters import attach
from ..methods.baselines import random_drop
from .evaluate import accuracy
from .model import word_level_tokenizer
from .recipe import RenderedExample, mixed_training_stream
from .scenes import DATASET_VERSION, IMAGE_SIZE, Example, make_split, rng_for
from .train import TrainConfig, collate, cosine_lr, optimizer_step, word_alignment_loss

MODEL_TYPE = "qwen2_5_vl"
#: the Qwen placeholder tokens, by the tokenizer attribute the processor reads
VISUAL_TOKENS = MappingProxyType({"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
                                  "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"})
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
PATCH = 14
MERGE = 2
UNIT = PATCH * MERGE  # pixels per LLM token side
#: image sides the scenes are resized to (multiples of 28: 9 to 16 LLM tokens per side)
SIDES = tuple(range(9 * UNIT, 16 * UNIT + 1, UNIT))
MAX_ASPECT = 1.5
SIZE_STREAM = 7  # the scene generator's stream of each sample for its image size (scenes use 0-2)
#: the proxy's processor accepts any image and resizes it to between these many pixels
MIN_PIXELS, MAX_PIXELS = (8 * UNIT) ** 2, (16 * UNIT) ** 2


@dataclass(frozen=True)
class QwenProxyShape:
    """Widths and depths of the Qwen proxy (Qwen2.5-VL geometry, small widths; about 9.2M
    parameters, under 20 MB of fp16 safetensors). The decoder matches the LLaVA proxy's."""

    vision_layers: int = 24
    vision_hidden: int = 128
    vision_heads: int = 4
    vision_mlp: int = 256
    window_size: int = 112
    full_attention_blocks: tuple[int, ...] = (5, 11, 17, 23)
    llm_layers: int = 8
    llm_hidden: int = 224
    llm_heads: int = 4
    llm_kv_heads: int = 4
    llm_mlp: int = 576
    mrope_section: tuple[int, ...] = (8, 10, 10)  # halves of the 56-wide heads: temporal, height, width


def image_size_for(seed: int, index: int) -> tuple[int, int]:
    """``(width, height)`` of sample ``index`` of the split seeded ``seed``: sides from
    :data:`SIDES`, aspect ratio at most :data:`MAX_ASPECT`."""
    rng = rng_for(seed, index, stream=SIZE_STREAM)
    pairs = [(w, h) for w in SIDES for h in SIDES if max(w, h) <= MAX_ASPECT * min(w, h)]
    return pairs[int(rng.integers(len(pairs)))]


def rendered_at_size(example: Example, textured: bool = False) -> RenderedExample:
    """``example`` with its scene rendered and resized to its own :func:`image_size_for`."""
    from PIL import Image

    size = image_size_for(example.seed, example.index)
    image = example.image(textured).resize(size, Image.Resampling.BICUBIC)
    return RenderedExample(image, example.question, example.answer, example.family, example)


def token_words(example: Example, width: int, height: int) -> list[tuple[str, ...]]:
    """``[(height / 28) * (width / 28)]`` words of each LLM token of the scene resized to
    ``width x height``, in raster order: ``(color, shape)`` of the object whose box holds the
    token's centre, ``(word,)`` for the written word's box, ``()`` for background. A box that
    holds no token centre (a small object at a low resolution) owns the token under its own
    centre, so that every object is named by some token."""
    cols, rows = width // UNIT, height // UNIT
    sx, sy = IMAGE_SIZE / width, IMAGE_SIZE / height  # resized pixels -> scene pixels
    labels: list[tuple[str, ...]] = [()] * (rows * cols)
    boxes = [(obj.bbox, (obj.color, obj.shape)) for obj in example.scene.objects]
    if example.scene.word is not None:
        boxes.append((example.scene.word_box, (example.scene.word,)))
    centres_x = [(c + 0.5) * UNIT * sx for c in range(cols)]
    centres_y = [(r + 0.5) * UNIT * sy for r in range(rows)]
    for (x0, y0, x1, y1), words in boxes:
        inside = [r * cols + c for r, y in enumerate(centres_y) if y0 <= y < y1
                  for c, x in enumerate(centres_x) if x0 <= x < x1]
        if not inside:
            col = min(cols - 1, int((x0 + x1) / 2 / sx // UNIT))
            row = min(rows - 1, int((y0 + y1) / 2 / sy // UNIT))
            inside = [row * cols + col]
        for token in inside:
            labels[token] = words
    return labels


def qwen_proxy_processor(words: Sequence[str]):
    """The Qwen2.5-VL processor of the proxy: Qwen2-VL's image processor (PIL backend; images
    resized to between :data:`MIN_PIXELS` and :data:`MAX_PIXELS`), the word-level tokenizer with
    Qwen's placeholder tokens, the proxy's chat template. No video processor (it needs torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..qwen_processor import image_only_processor

    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                               min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return image_only_processor(MODEL_TYPE, image_processor, word_level_tokenizer(words, VISUAL_TOKENS), CHAT_TEMPLATE)


def qwen_proxy_config(tokenizer, shape: QwenProxyShape = QwenProxyShape()):
    """A ``Qwen2_5_VLConfig`` for ``shape`` whose vocabulary and special ids come from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in VISUAL_TOKENS.items()}
    vision = Qwen2_5_VLVisionConfig(
        depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
        num_heads=shape.vision_heads, out_hidden_size=shape.llm_hidden, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=2, window_size=shape.window_size, fullatt_block_indexes=list(shape.full_attention_blocks))
    text = Qwen2_5_VLTextConfig(
        hidden_size=shape.llm_hidden, intermediate_size=shape.llm_mlp, num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(shape.mrope_section)})
    return Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), tie_word_embeddings=True,
                            image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                            vision_start_token_id=ids["vision_start_token"],
                            vision_end_token_id=ids["vision_end_token"])


def language_words(llava_processor) -> list[str]:
    """The words of a LLaVA proxy's tokenizer, without its special and image tokens."""
    specials = set(llava_processor.tokenizer.all_special_tokens)
    return [w for w in llava_processor.tokenizer.get_vocab() if w not in specials]


def build(words: Sequence[str], shape: QwenProxyShape = QwenProxyShape(), seed: int = 0):
    """A fresh (random) Qwen proxy model and its processor over ``words``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = qwen_proxy_processor(words)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(qwen_proxy_config(processor.tokenizer, shape)), processor


@torch.no_grad()
def transfer_language_model(model: nn.Module, tokenizer, llava: nn.Module, llava_tokenizer) -> int:
    """Copy a LLaVA proxy's Llama decoder into ``model``'s Qwen2.5-VL decoder (same widths and
    depth): every layer's projections and norms, the final norm, and each word's embedding row
    (matched by the word, not the id). Qwen's query/key/value biases start at zero, so text-only
    inputs give the Llama decoder's outputs (M-RoPE with equal sections is 1-D RoPE on text).
    Returns the number of embedding rows copied."""
    source, target = llava.model.language_model, model.model.language_model
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("embed_tokens")}
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or any(not (k.endswith("_proj.bias") or k.startswith("embed_tokens")) for k in missing):
        raise ValueError(f"the LLaVA decoder does not fit: missing {missing}, unexpected {unexpected}")
    for name in missing:
        if name.endswith("_proj.bias"):
            target.get_parameter(name).zero_()
    rows = source.embed_tokens.weight
    copied = 0
    old_vocab = llava_tokenizer.get_vocab()
    for word, row in tokenizer.get_vocab().items():
        if word in old_vocab:
            target.embed_tokens.weight[row] = rows[old_vocab[word]]
            copied += 1
    return copied


def training_stream(turns: int = 12, textured: bool = False) -> Callable[[int], RenderedExample]:
    """``sample_at(i)``: procedural train sample ``i`` at its own size, with up to ``turns - 1``
    more questions about the same image."""
    return mixed_training_stream((), 0, 0, turns, textured, render=rendered_at_size)


def sample_token_words(sample: RenderedExample) -> list[tuple[str, ...]] | None:
    return token_words(sample.example, *sample.image.size) if sample.example is not None else None


def fast_encoder(processor) -> Callable[[list, list[str]], dict]:
    """``encode(images, prompts)``: what ``processor(images=..., text=..., return_tensors="pt",
    padding=True)`` returns for one image per prompt, with ``pixel_values`` left as ``uint8``
    patches (4x less to build and move than float32; :func:`normalize_patches` finishes them on the
    device). Images must already have a size the processor keeps (sides multiples of 28, pixels
    within its bounds), as the training scenes have."""
    import numpy as np

    tokenizer, images_in = processor.tokenizer, processor.image_processor
    token, token_id = processor.image_token, processor.image_token_id
    patch, merge, temporal = images_in.patch_size, images_in.merge_size, images_in.temporal_patch_size
    factor = patch * merge
    low, high = images_in.size["shortest_edge"], images_in.size["longest_edge"]
    with_types = "mm_token_type_ids" in processor.model_input_names

    def encode(images: list, prompts: list[str]) -> dict:
        patches, grids = [], []
        for image in images:
            pixels = np.asarray(image.convert("RGB"))
            height, width = pixels.shape[:2]
            if height % factor or width % factor or not low <= height * width <= high:
                raise ValueError(f"fast_encoder needs sides that are multiples of {factor} and {low} to {high} "
                                 f"pixels, got {width}x{height}; use the processor itself")
            grid_h, grid_w = height // patch, width // patch
            laid = pixels.transpose(2, 0, 1).reshape(3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
            laid = laid.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]  # (gh, gw, mh, mw, C, T, ph, pw)
            laid = np.broadcast_to(laid, (*laid.shape[:5], temporal, patch, patch))
            patches.append(laid.reshape(grid_h * grid_w, 3 * temporal * patch * patch))
            grids.append((1, grid_h, grid_w))
        texts = [prompt.replace(token, token * (h * w // merge ** 2), 1) for prompt, (_, h, w) in zip(prompts, grids)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
               "pixel_values": torch.from_numpy(np.concatenate(patches)), "image_grid_thw": torch.tensor(grids)}
        if with_types:
            out["mm_token_type_ids"] = (encoded["input_ids"] == token_id).long()
        return out

    return encode


def normalize_patches(patches: Tensor, processor) -> Tensor:
    """``uint8`` patches ``[N, C * T * P * P]`` from :func:`fast_encoder` rescaled and normalised
    as the image processor does (float32)."""
    images_in = processor.image_processor
    per_channel = images_in.temporal_patch_size * images_in.patch_size ** 2
    mean = torch.tensor(images_in.image_mean, device=patches.device).repeat_interleave(per_channel)
    std = torch.tensor(images_in.image_std, device=patches.device).repeat_interleave(per_channel)
    return (patches.float() * images_in.rescale_factor - mean) / std


def teacher_targets(features: Tensor, grids: Tensor, merge: int = MERGE) -> Tensor:
    """The LLaVA proxy's image tokens ``[B, 576, D]`` (a 24 x 24 grid over each 336 px scene)
    averaged over the scene region of each LLM token of the Qwen images with patch grids
    ``grids`` ``[B, 3]`` (t, h, w): ``[sum of (h / merge) * (w / merge), D]`` in raster order,
    image after image (the merger's output order). The Qwen image is the same scene resized, so
    its token grid covers the same area (adaptive average pooling)."""
    side = round(features.shape[1] ** 0.5)
    maps = features.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)
    out = []
    for scene, (_, h, w) in zip(maps, grids.tolist()):
        pooled = nn.functional.adaptive_avg_pool2d(scene[None].float(), (h // merge, w // merge))[0]
        out.append(pooled.flatten(1).T)
    return torch.cat(out)


def distillation_loss(student: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of ``student`` ``[N, D]`` against ``target`` ``[N, D]``, relative to the
    target's mean square (1.0: as far as predicting zeros)."""
    return nn.functional.mse_loss(student.float(), target.float()) / target.float().pow(2).mean().clamp_min(1e-12)


def train(model: nn.Module, processor, sample_at: Callable[[int], RenderedExample], config: TrainConfig,
          words_of: Callable[[RenderedExample], list[tuple[str, ...]] | None] = sample_token_words,
          log: Callable[[str], None] = print, teacher: tuple[nn.Module, object] | None = None) -> dict:
    """Train the Qwen proxy in place: answer loss, ``config.patch_weight`` x the word alignment of
    every LLM visual token (:func:`~ficoco.proxy.train.word_alignment_loss`; not on token-drop
    steps, whose merged tokens are a subset), and with probability ``config.token_drop_prob`` a
    step whose LLM sees a random share in ``[config.token_drop_min_share, 1)`` of each image's
    tokens. On CUDA the tower attends through :func:`ficoco.fast_vision_attention`'s padded
    one-call path. With ``config.distill_weight > 0``, ``teacher`` (a LLaVA proxy model and its
    processor, frozen) gives each LLM visual token a target: the teacher's image tokens over the
    same region of the scene at 336 px (:func:`teacher_targets`, :func:`distillation_loss`; not
    on token-drop steps). Returns the loss curve and timing."""
    from torch.utils.data import DataLoader

    from ..adapters.varlen import fast_vision_attention

    if not 0.0 <= config.token_drop_prob <= 1.0:
        raise ValueError(f"token_drop_prob must lie in [0, 1], got {config.token_drop_prob}")
    if not 0.0 < config.token_drop_min_share < 1.0:
        raise ValueError(f"token_drop_min_share must lie in (0, 1), got {config.token_drop_min_share}")
    if config.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight needs a teacher (a LLaVA proxy and its processor)")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.98))
    merged: dict[str, Tensor] = {}
    hooks = [model.model.visual.merger.register_forward_hook(
        lambda module, args, output: merged.update(tokens=output))]
    distilling = config.distill_weight > 0
    if distilling:
        teacher_model, teacher_processor = teacher
        teacher_model.to(device).eval().requires_grad_(False)
        # the projected image tokens, whatever get_image_features returns in this transformers
        hooks.append(teacher_model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: merged.update(teacher=output)))
    vocab, unknown = processor.tokenizer.get_vocab(), processor.tokenizer.unk_token_id
    encode = fast_encoder(processor)

    def make_batch(indices: list[int]) -> tuple[dict, Tensor | None]:
        samples = [sample_at(i) for i in indices]
        labelled = [words_of(s) for s in samples]
        targets = None
        if all(grid is not None for grid in labelled):  # [all tokens of the batch, 2] word ids, -100 where none
            targets = torch.tensor([([vocab.get(w, unknown) for w in words[:2]] + [-100, -100])[:2]
                                    for grid in labelled for words in grid])
        batch = collate(samples, processor, encode=encode)
        if distilling:  # the same scenes at the teacher's 336 px
            batch["teacher_pixels"] = teacher_processor.image_processor(
                images=[s.example.image() for s in samples], return_tensors="pt")["pixel_values"]
        return batch, targets

    loader = DataLoader(range(config.steps * config.batch_size), batch_size=config.batch_size, shuffle=False,
                        num_workers=config.num_workers, collate_fn=make_batch, pin_memory=device.type == "cuda",
                        persistent_workers=config.num_workers > 0)
    drop_draws = torch.Generator().manual_seed(config.seed)  # its own stream: drops move no other draw
    use_autocast = device.type == "cuda"
    autocast_dtype = getattr(torch, config.dtype)
    curve, started, stopped_at = [], time.time(), None
    one_call = fast_vision_attention(model, kernel="padded") if device.type == "cuda" else contextlib.nullcontext()
    try:
        with one_call:
            batches, data_seconds = iter(loader), 0.0
            for step in range(config.steps):
                waiting = time.time()
                batch, targets = next(batches)
                data_seconds += time.time() - waiting  # the part of the step spent waiting for the workers
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * cosine_lr(step, config)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                batch["pixel_values"] = normalize_patches(batch["pixel_values"], processor)
                teacher_pixels = batch.pop("teacher_pixels", None)
                dropping = (config.token_drop_prob > 0
                            and float(torch.rand((), generator=drop_draws)) < config.token_drop_prob)
                share = (config.token_drop_min_share
                         + (1 - config.token_drop_min_share) * float(torch.rand((), generator=drop_draws)))
                with attach(model, random_drop(share, seed=step)) if dropping else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                        out = model(**batch)
                        loss, patch_loss = out.loss, torch.zeros((), device=device)
                        distill_loss = torch.zeros((), device=device)
                        if targets is not None and not dropping:
                            embeddings = model.get_input_embeddings().weight
                            patch_loss = word_alignment_loss(merged["tokens"].float()[None], embeddings.float(),
                                                             targets.to(device)[None])
                            loss = loss + config.patch_weight * patch_loss
                        if distilling and not dropping:
                            with torch.no_grad():
                                teacher_model.model.get_image_features(pixel_values=teacher_pixels)
                                wanted = teacher_targets(merged["teacher"], batch["image_grid_thw"])
                            distill_loss = distillation_loss(merged["tokens"], wanted)
                            loss = loss + config.distill_weight * distill_loss
                elapsed, out_of_time = optimizer_step(loss, optimizer, params, config, started)
                if step % config.log_every == 0 or step == config.steps - 1 or out_of_time:
                    entry = dict(step=step, loss=float(out.loss.detach()), patch_loss=float(patch_loss.detach()),
                                 distill_loss=float(distill_loss.detach()),
                                 visual_share=share if dropping else 1.0, lr=optimizer.param_groups[0]["lr"],
                                 seconds=elapsed, data_seconds=data_seconds)
                    curve.append(entry)
                    log(f"step {step:5d}  answer loss {entry['loss']:.4f}  patch loss {entry['patch_loss']:.4f}  "
                        f"distill loss {entry['distill_loss']:.4f}  "
                        f"visual share {entry['visual_share']:.2f}  lr {entry['lr']:.2e}  {elapsed:.0f}s "
                        f"({data_seconds:.0f}s waiting for data)")
                if out_of_time:
                    stopped_at = step
                    log(f"stopped after {elapsed:.0f}s at step {step} of {config.steps} (max_seconds)")
                    break
    finally:
        for hook in hooks:
            hook.remove()
    model.eval()
    return {"config": asdict(config), "curve": curve, "seconds": time.time() - started, "stopped_at_step": stopped_at}


def validation_samples(size: int, split: str = "validation", textured: bool = False) -> list[RenderedExample]:
    """The first ``size`` samples of a procedural split, each at its own size."""
    return [rendered_at_size(e, textured) for e in make_split(split, size=size)]


def train_qwen_proxy(out_dir: str, config: TrainConfig, language_from: str | None, shape: QwenProxyShape = QwenProxyShape(),
                     eval_size: int = 500, turns: int = 12, init_from: str | None = None,
                     teacher_from: str | None = None, log=print) -> dict:
    """Build the Qwen proxy (decoder from the LLaVA proxy at ``language_from``, or continue from the
    Qwen checkpoint ``init_from``), train it, evaluate it on the first ``eval_size`` validation
    samples, save it (fp16 safetensors, the processor, ``training.json``) to ``out_dir``.
    ``config.distill_weight > 0`` distils from the LLaVA proxy at ``teacher_from`` (default:
    ``language_from``)."""
    from ..checkpoint import load_model, load_processor
    from ..qwen_processor import save_processor

    if init_from is not None:
        model, processor = load_model(init_from, dtype=torch.float32), load_processor(init_from)
        copied = None
    else:
        if language_from is None:
            raise ValueError("the Qwen proxy needs language_from (a LLaVA proxy checkpoint) or init_from")
        llava, llava_processor = load_model(language_from, dtype=torch.float32), load_processor(language_from)
        model, processor = build(language_words(llava_processor), shape, config.seed)
        with torch.no_grad():
            copied = transfer_language_model(model, processor.tokenizer, llava, llava_processor.tokenizer)
        log(f"decoder from {language_from}: {copied} word embeddings copied")
    teacher_from = teacher_from or language_from
    teacher = None
    if config.distill_weight > 0:
        if teacher_from is None:
            raise ValueError("distillation needs teacher_from (a LLaVA proxy checkpoint)")
        teacher = (load_model(teacher_from, dtype=torch.float32), load_processor(teacher_from))
    started = time.time()
    record = train(model, processor, training_stream(turns), config, log=log, teacher=teacher)
    metrics = accuracy(model, processor, validation_samples(eval_size), batch_size=64) if eval_size > 0 else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    save_processor(processor, out)
    import transformers

    record["environment"] = {
        "device": torch.cuda.get_device_name() if config.device.startswith("cuda") else config.device,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime())}
    record.update(language_from=language_from, init_from=init_from,
                  teacher_from=teacher_from if config.distill_weight > 0 else None, embedding_rows_copied=copied, turns=turns,
                  dataset_version=DATASET_VERSION, image_sides=list(SIDES), max_aspect=MAX_ASPECT,
                  shape=asdict(shape), parameters=sum(p.numel() for p in model.parameters()),
                  validation_size=eval_size, validation_accuracy=metrics, total_seconds=time.time() - started)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    log(f"validation accuracy: {metrics}")
    return record
