"""Running an :class:`~ficoco.methods.InputReduction` on the projected visual tokens (LLaVA-1.5).

A forward hook on the multimodal projector reduces its output ``[images, N, D]`` to
``[images, N', D]`` before the model scatters it into the prompt, whose image placeholders the
family's prompt rewriting has cut to ``N'`` (as for encoder-side methods). Stages conditioned on
the instruction read the input embeddings of the text that follows each image in its prompt
(:class:`~ficoco.stages.FeatureProbe`), from the prompt the family's rewriting last saw
(:meth:`InputSide.remember_prompt`): newer ``generate`` runs the projector before the model's own
forward, so a hook on that forward would come too late.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..methods import InputReduction
from ..stages import FeatureProbe, ReductionResult, TokenGroup
from .hooks import host_to_device


@dataclass
class InputTrace:
    """What the input reduction did to one batch of images.

    Attributes:
        positions: ``[I, N']`` raster position of each token handed to the LLM.
        sizes: ``[I, N']`` patches each of them stands for.
        result: the reduction's stage outputs when recording is on.
    """

    positions: Tensor
    sizes: Tensor
    result: ReductionResult | None


def instruction_rows(input_ids: Tensor, attention_mask: Tensor | None, image_token_id: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """For each image run of ``input_ids`` (``[B, L]``; runs counted row by row): ``(sample [I],
    rows [I, M], valid [I, M])``, the sequence columns of the text after that image up to the next
    image or the end of its prompt (padding excluded).

    Worked out on the host: the prompt (a few thousand integers) comes over in one copy, and the
    result goes back in one pinned, non-blocking copy. Done on the device, it took some thirty
    small kernels and three waits for their results, all before the encoder could be queued.

    Raises:
        ValueError: an image has no text after it (a filter reading the instruction has nothing to
            weigh its tokens by).
    """
    b, length = input_ids.shape
    device = input_ids.device
    prompt = input_ids if attention_mask is None else torch.stack([input_ids, attention_mask.to(input_ids.dtype)])
    prompt = prompt.cpu().numpy()
    ids, real = (prompt, None) if attention_mask is None else (prompt[0], prompt[1] != 0)
    is_image = ids == image_token_id
    starts = is_image.copy()
    starts[:, 1:] &= ~is_image[:, :-1]
    run = np.cumsum(starts, axis=1)  # [B, L]: image runs begun so far in the row
    per_row = run[:, -1]
    earlier = np.cumsum(per_row) - per_row  # runs in the rows before
    text = ~is_image & (run > 0)
    if real is not None:
        text &= real
    owner = (earlier[:, None] + run - 1)[text]  # the image each text token follows, row-major
    columns = np.broadcast_to(np.arange(length), (b, length))[text]
    images = int(per_row.sum())
    counts = np.bincount(owner, minlength=images)
    if images and counts.min() == 0:
        lacking = int(np.flatnonzero(counts == 0)[0])
        row = int(np.searchsorted(np.cumsum(per_row), lacking, side="right"))
        raise ValueError(f"ficoco: the image in prompt {row} has no instruction text after it, and this method "
                         f"weighs the visual tokens by that text")
    width = int(counts.max()) if images else 0
    # owners never decrease in row-major order, so each image's text is one contiguous stretch
    place = np.arange(owner.shape[0]) - (np.cumsum(counts) - counts)[owner]
    laid = np.zeros((images, 2 * width + 1), dtype=np.int64)  # [rows | valid | sample]: one copy over
    laid[owner, place] = columns
    laid[owner, width + place] = 1
    laid[:, -1] = np.repeat(np.arange(b), per_row)
    laid = torch.from_numpy(laid)
    laid = laid.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else laid.to(device)
    return laid[:, -1], laid[:, :width], laid[:, width:2 * width].bool()


class InputSide:
    """Hooks an input reduction onto a LLaVA model's multimodal projector.

    Args:
        stage: the reduction and its budget.
        removed: tokens removed per image (the plan's ``input_removed``).
        grid: the patch grid of one image.
        leading: rows at the front of each image's features that are never candidates ([CLS] when
            the model hands it to the LLM).
        image_token_id: the placeholder token, to find each image's instruction.
        embed: the model's input embedding layer.
        token_state: ``(sizes, positions)`` ``[I, N]`` of the projected tokens (after an
            encoder-side reduction), or ``None`` for fresh patches.
        crops_per_run: ``input_ids [B, L] -> [crops of each placeholder run]`` (runs counted row by
            row), for a model whose projector sees several crops per image (LLaVA-NeXT): each crop
            is then reduced on its own, with the instruction of its image's run. ``None``: one
            grid per run.
    """

    def __init__(self, stage: InputReduction, removed: int, *, grid: tuple[int, int], leading: int,
                 image_token_id: int, embed: nn.Module, token_state=None, record: bool = False,
                 crops_per_run=None) -> None:
        self.stage, self.removed, self.grid, self.leading = stage, removed, grid, leading
        self.image_token_id, self.embed, self.token_state, self.record = image_token_id, embed, token_state, record
        self.crops_per_run = crops_per_run
        self.prompt: tuple[Tensor, Tensor | None, int, tuple[Tensor, Tensor, Tensor] | None] | None = None
        self.last: InputTrace | None = None
        self.active = None
        self.step_graphs = None  # a CapturedCalls while graph_input_reduction is in effect

    def install(self, hooks, projector: nn.Module, active=None) -> None:
        """Reduce ``projector``'s outputs; ``active()``, when given, says whether this call's are
        this side's (a projector shared by images and video frames: Video-LLaVA)."""
        self.active = active
        hooks.post(projector, self._reduce)

    def remember_prompt(self, input_ids: Tensor | None, attention_mask: Tensor | None, per_run: int = 1) -> None:
        """The (already cut) prompt whose images the projector is about to see; used once.
        ``per_run``: projected items per placeholder run (the frames of a video)."""
        if input_ids is not None and attention_mask is not None and attention_mask.dim() == 4:
            # a prepared [B, 1, Q, K] mask (transformers 5.17's generate with a static cache): the
            # prompt's last query row may attend to exactly its real keys, whichever side pads
            row = attention_mask[:, 0, -1, :input_ids.shape[1]]
            attention_mask = (row == 0) if row.is_floating_point() else row.bool()
        if input_ids is None:
            self.prompt = None
            return
        if self.prompt is not None and self.prompt[0] is input_ids and self.prompt[1] is attention_mask:
            return  # the same prompt again (the outer model's hook, then the inner model's)
        # finding the instruction's tokens makes the host wait for the GPU once (their count): a
        # filter that reads them finds them now, before the encoder is queued, rather than after
        # it, where the GPU would sit idle while the host launches the rest of the reduction
        found = (instruction_rows(input_ids, attention_mask, self.image_token_id)
                 if self.removed and self.stage.reduction.filter.reads_instruction else None)
        self.prompt = (input_ids, attention_mask, per_run, found)

    def _probe(self, images: int, dtype) -> FeatureProbe:
        if self.prompt is None:
            return FeatureProbe()
        (input_ids, attention_mask, per_run, found), self.prompt = self.prompt, None

        def instruction() -> tuple[Tensor, Tensor]:
            samples, rows, valid = found or instruction_rows(input_ids, attention_mask, self.image_token_id)
            if self.crops_per_run is not None:  # every crop of an image reads its run's instruction
                crops = host_to_device(self.crops_per_run(input_ids), samples.device)
                if crops.numel() == samples.numel():
                    samples, rows, valid = (x.repeat_interleave(crops, dim=0) for x in (samples, rows, valid))
                if samples.numel() != images:
                    raise ValueError(f"the prompt has {samples.numel()} image placeholder runs for {images} image(s)")
            else:
                if samples.numel() * per_run != images:
                    raise ValueError(f"the prompt has {samples.numel()} placeholder runs of {per_run} item(s) each "
                                     f"for {images} projected item(s)")
                if per_run > 1:  # every frame of a video reads the text after the video
                    samples, rows, valid = (x.repeat_interleave(per_run, dim=0) for x in (samples, rows, valid))
            with torch.no_grad():
                text = self.embed(input_ids[samples[:, None], rows])  # [I, M, D]
            return text.to(dtype), valid

        return FeatureProbe(instruction)

    def _reduce(self, module, args, output: Tensor) -> Tensor | None:
        if self.removed == 0 or (self.active is not None and not self.active()):
            return None
        features = output[:, self.leading:]
        images, n, _ = features.shape
        state = self.token_state(images, n, features.device) if self.token_state is not None else None
        sizes, positions = (None, None) if state is None else state
        probe = self._probe(images, features.dtype)
        reduction = self.stage.reduction
        text, valid = (probe.text_embeddings, probe.text_valid) if reduction.filter.reads_instruction else (None, None)
        graphs = self.step_graphs
        # a filter that decides its counts reads them on the host, and a prompt without instruction
        # text raises in the stage: those run eagerly
        if graphs is not None and features.is_cuda and not self.record and not torch.is_grad_enabled() \
                and not (reduction.adaptive or reduction.decides_removals) \
                and (text is not None or not reduction.filter.reads_instruction):
            kept, positions, sizes = graphs((self.removed, self.grid), self._reduction_step, features, text, valid,
                                            sizes, positions)
            result = None
        else:
            kept, positions, sizes, result = self._reduction_step(features, text, valid, sizes, positions,
                                                                  with_result=True)
        self.last = InputTrace(positions, sizes, result if self.record else None)
        kept = kept.to(output.dtype)
        return torch.cat([output[:, :self.leading], kept], dim=1) if self.leading else kept

    def _reduction_step(self, features: Tensor, text: Tensor | None, valid: Tensor | None, sizes: Tensor | None,
                        positions: Tensor | None, with_result: bool = False):
        """The reduction as a pure function of its tensors (what :func:`graph_input_reduction`
        captures): ``features`` ``[I, N, D]``, the instruction's embeddings ``text`` ``[I, M, D]``
        and ``valid`` ``[I, M]`` (``None`` for a filter that does not read them), the tokens'
        ``sizes`` and ``positions`` ``[I, N]`` (``None``: fresh patches). Returns the survivors'
        ``(features, positions, sizes)``, and the :class:`ReductionResult` with ``with_result``."""
        if sizes is None:
            tokens = TokenGroup.fresh(features, self.grid)
        else:
            tokens = TokenGroup(features, sizes, positions, self.grid)
        probe = FeatureProbe(None if text is None else (lambda: (text, valid)))
        result = self.stage.reduction(tokens, probe, self.removed)
        out = (result.tokens.features, result.tokens.positions, result.tokens.sizes)
        return (*out, result) if with_result else out
