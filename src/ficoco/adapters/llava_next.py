"""The LLaVA-NeXT family: ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (anyres images).

What this family is to ficoco (the layout itself: :mod:`.anyres`):

- **vision layers**: a CLIP (or SigLIP: methods use their stand-ins) tower that encodes every
  image as crops, a base crop and ``tile_rows x tile_cols`` tiles, each the tower's own
  ``side x side`` patch grid (24 x 24 for CLIP-336/14), features from ``vision_feature_layer``;
- **budgets**: ``retain`` is per crop (a count of the crop's ``side²`` patches, or a share of
  them), as in LLaVA-1.5, so an image of ``c`` crops keeps ``c x k`` visual tokens: 5 x 64 = 320
  for a 672 x 672 image at ``retain=64``. Every image's count follows from its size, so the
  prompt's placeholders are cut before the model runs;
- **before the LLM** (encoder-side and LLM-input methods): each crop is reduced on its own, in the
  tower (:class:`~.vision.VisionSide`) or on the projector's output (:class:`~.input_side.InputSide`,
  CDPruner's instruction being the text after the crop's image). The reduced crops no longer form
  grids, so LLaVA-NeXT's packing (unpadding, a newline token after each row) is replaced by an
  instance-level ``pack_image_features`` wrapper: the base crop's tokens, then the tiles' tokens
  in the raster order of the tiles' full grid, fused tokens last (:meth:`.AnyresLayout.pack`); no
  unpadding and no newline tokens;
- **inside the LLM** (decoder-side methods) the prompt is the model's own: base, unpadded tiles,
  newline tokens. Newline tokens are never candidates (kept, like text, but not text queries); an
  image of ``c`` crops keeps ``min(c x k, its patch tokens)``, spread by the method's own
  schedule over its layers; samples with different images remove different counts (dead rows,
  :mod:`.language`);
- **positions**: 1-D; kept tokens keep their prompt positions inside the LLM, and the shortened
  prompt of a reduction before the LLM is numbered afresh, as in LLaVA-1.5.

Refused in one line: the ``downsample`` control (a lower resolution per crop would need the
packing rebuilt for smaller grids) and adaptive counts (PruMerge without ``retain``), whose
per-crop counts are known only after the tower ran.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from ..methods import Method, ModelGeometry, ResolvedPlan
from .anyres import LLM_GRID, AnyresLayout, anyres_layout
from .handle import ReductionHandle
from .hooks import host_to_device
from .input_side import InputSide
from .inputs import cut_prompt_inputs, run_keep_mask
from .language import LanguageSide
from .llava import vision_layout
from .vision import VisionSide


def _sizes_of(image_sizes) -> list[tuple[int, int]]:
    """``[(height, width)]`` of ``image_sizes`` (a ``[I, 2]`` tensor or a list of pairs)."""
    rows = image_sizes.tolist() if isinstance(image_sizes, Tensor) else image_sizes
    return [tuple(int(x) for x in size) for size in rows]


def split_model(model: nn.Module, outer: str, inner: str, family: str) -> tuple[nn.Module, nn.Module | None]:
    """``(inner model, outer model or None)`` of a LLaVA-NeXT-layout family whose transformers
    classes are named ``outer`` (``...ForConditionalGeneration``) and ``inner``, or a clear error."""
    import transformers

    if isinstance(model, getattr(transformers, outer)):
        return model.model, model
    if isinstance(model, getattr(transformers, inner)):
        return model, None
    raise TypeError(f"ficoco's {family} family takes {outer} and {inner}; got {type(model).__name__}")


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(LlavaNextModel, LlavaNextForConditionalGeneration or None)`` or a clear error."""
    return split_model(model, "LlavaNextForConditionalGeneration", "LlavaNextModel", "LLaVA-NeXT")


class LlavaNextHandle(ReductionHandle):
    """A method attached to a Hugging Face LLaVA-NeXT model.

    Attributes:
        plan: the per-crop schedule (encoder and LLM input: what each crop keeps; decoder: the
            per-crop budget that each image's own schedule scales, see :meth:`image_plan`).
    """

    family = "llava-next"
    #: the family's name in messages
    family_name = "LLaVA-NeXT"

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        return _parts(model)

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, outer = self._parts(model)
        if method.resolution is not None:
            raise ValueError(f"{method.name} lowers each crop's resolution, which {self.family_name}'s packing "
                             f"(unpadding and newline tokens on the crops' full grids) does not take; it runs on "
                             f"LLaVA-1.5 and Qwen-VL")
        if method.vision is not None and method.vision.adaptive:
            raise ValueError(f"{method.name} without a budget decides each crop's count in the tower, after "
                             f"{self.family_name}'s prompt must hold every image's count; give retain=")
        super().__init__(model, llava, outer, method, record=record)
        self.llava, config = llava, llava.config
        layers, has_cls, grid, feature_layer = vision_layout(llava)
        self.encoder_layers, self.grid, self.has_cls = layers, grid, has_cls
        if not has_cls:
            self.method = method = method.without_cls()
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if has_cls and strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={strategy!r} hands the LLM each crop's [CLS] too, "
                             f"which {self.family_name}'s packing into patch grids does not take; use 'default'")
        if not has_cls and strategy == "default":
            raise ValueError(f"vision_feature_select_strategy='default' drops the first of each crop's patches (a "
                             f"SigLIP tower has no [CLS] to drop), which {self.family_name}'s packing into patch grids "
                             f"does not take; use 'full'")
        self.image_token = config.image_token_id
        self.pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.crop_size, self.patch_size = config.vision_config.image_size, config.vision_config.patch_size
        self.llm_layers = len(llava.language_model.layers)
        geometry = ModelGeometry(len(layers), feature_layer, grid[0] * grid[1], self.llm_layers, grid=grid)
        self.plan: ResolvedPlan = method.plan(geometry)
        self.layout = lru_cache(maxsize=None)(self._layout)
        self.image_plan = lru_cache(maxsize=None)(self._image_plan)
        self._sizes: list[tuple[int, int]] = []  # (height, width) of the images last encoded or prompted
        self._prompt_crops: list[int] = []  # crops per image of the prompt last cut (CDPruner's instruction)
        self._packed: list[tuple[Tensor, Tensor]] = []  # per image: (indices, sizes) of its reduced tokens
        self._rows: list[list[int]] = []  # per sample of the last prefill: its images
        self._attach()

    def _install(self) -> None:
        llava, outer, method, plan = self.llava, self.outer, self.method, self.plan
        if self._cuts:
            self.hooks.pre(llava, self._rewrite_model_inputs, with_kwargs=True)
            if outer is not None:
                self.hooks.pre(outer, self._rewrite_model_inputs, with_kwargs=True)
                self._wrap_generate(outer)
            self._wrap(llava, "pack_image_features", self._pack_reduced)
        self._wrap(llava, "get_image_features", self._remember_encoded)
        if plan.vision:
            self.vision = VisionSide(self.encoder_layers, method.vision, plan.vision, grid=self.grid,
                                     has_cls=self.has_cls, record=self.record)
            self.vision.install(self.hooks)
        if plan.input_removed:
            self.input = InputSide(method.input, plan.input_removed, grid=self.grid, leading=0,
                                   image_token_id=self.image_token, embed=llava.get_input_embeddings(),
                                   token_state=self._encoder_state if plan.vision else None, record=self.record,
                                   crops_per_run=self._crops_per_run)
            self.input.install(self.hooks, llava.multi_modal_projector)
        if method.language is not None and plan.language:
            self.hooks.pre(llava, self._remember_prompted, with_kwargs=True)  # before the language side's own
            self.language = LanguageSide(llava, method.language, self._language_layers(), schedule=self._schedule,
                                         visual_token_ids=self._visual_token_ids(), grid=LLM_GRID,
                                         token_state=self._token_state, record=self.record,
                                         candidates=self._candidates)
            self.language.install(self.hooks)
            self._install_loss_hooks()

    def _visual_token_ids(self) -> tuple[int, ...]:
        """The placeholders whose tokens a decoder-side method sees as visual."""
        return (self.image_token,)

    # -- geometry and budgets -------------------------------------------------------------------

    @property
    def _cuts(self) -> bool:
        """Whether crops are reduced before the LLM (so the prompt is cut and the packing replaced)."""
        return bool(self.plan.vision or self.plan.input_removed)

    @property
    def visual_tokens_per_crop(self) -> int:
        """Visual tokens each crop hands the LLM (after any reduction before it)."""
        return self.plan.llm_input_visual

    def _layout(self, size: tuple[int, int]) -> AnyresLayout:
        return anyres_layout(size, self.pinpoints, self.crop_size, self.patch_size)

    def prompt_tokens(self, image_size: tuple[int, int]) -> int:
        """Placeholders the LLM receives for an image of ``image_size`` (height, width) under this
        method: ``crops x k`` with a reduction before the LLM, else the model's own count."""
        layout = self.layout(tuple(int(x) for x in image_size))
        return layout.crops * self.plan.llm_input_visual if self._cuts else layout.full_tokens

    def kept_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens (newline tokens not counted) of an image of ``image_size`` after the last
        reduction."""
        layout = self.layout(tuple(int(x) for x in image_size))
        if self._cuts:
            return layout.crops * self.plan.llm_final_visual
        return layout.patch_tokens - sum(self.image_plan(layout).values())

    def _image_plan(self, layout: AnyresLayout) -> dict[int, int]:
        """``{decoder layer: removed}`` for one image: the per-crop removals times its crops after
        a reduction before the LLM; else its own schedule down to ``min(crops x k, patches)``."""
        if not self.plan.language:
            return {}
        if self._cuts:
            return {layer: layout.crops * removed for layer, removed in self.plan.language.items()}
        keep = min(layout.patch_tokens, layout.crops * self.plan.llm_final_visual)
        return self.method.language.resolve(self.llm_layers, layout.patch_tokens, keep=keep)

    def _language_layers(self) -> set[int]:
        """Every decoder layer some image's schedule may reduce in (a large image spreads its
        removals over every layer the method's schedule names)."""
        if self._cuts:
            return set(self.plan.language)
        nominal = self.method.language.resolve(self.llm_layers, 1 << 16, keep=self.plan.llm_final_visual)
        return set(nominal) | set(self.plan.language)

    # -- remembering the images -----------------------------------------------------------------

    def _remember_encoded(self, original):
        """``get_image_features`` that keeps the sizes of the images it encodes (newer
        transformers encode them in ``generate`` before a prefill that carries no sizes)."""
        def get_image_features(*args, **kwargs):
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            if sizes is not None:
                self._sizes = _sizes_of(sizes)
            return original(*args, **kwargs)

        return get_image_features

    def _remember_prompted(self, module, args, kwargs) -> None:
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        sizes = bound.get("image_sizes", bound.get("kwargs", {}).get("image_sizes"))
        if sizes is not None and bound.get("pixel_values") is not None:
            self._sizes = _sizes_of(sizes)

    def _image_layouts(self, sizes) -> list[AnyresLayout]:
        if sizes is None:
            raise ValueError(f"{self.family_name} needs image_sizes (height, width of each image) with pixel_values")
        return [self.layout(size) for size in _sizes_of(sizes)]

    # -- before the LLM: the prompt and the packing ---------------------------------------------

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        input_ids, pixel_values = inputs.get("input_ids"), inputs.get("pixel_values")
        if input_ids is None or pixel_values is None or not self._cuts:
            return inputs
        layouts = self._image_layouts(inputs.get("image_sizes"))
        full = [layout.full_tokens for layout in layouts]
        kept = [layout.crops * self.plan.llm_input_visual for layout in layouts]
        total = int((input_ids == self.image_token).sum())
        if total != sum(full) and total == sum(kept):
            return inputs  # already cut (generate's own forward calls)
        if total != sum(full):
            raise ValueError(f"the prompt has {total} image placeholders for {len(layouts)} image(s) of sizes "
                             f"{_sizes_of(inputs['image_sizes'])}; {self.family_name} expects {sum(full)} ({full})")
        keep = run_keep_mask(input_ids, self.image_token, full, kept)
        pad = self.llava.config.text_config.pad_token_id
        inputs = cut_prompt_inputs(inputs, keep, pad_token_id=self.image_token if pad is None else pad,
                                   default_side=default_side)
        if self.input is not None:
            self._prompt_crops = [layout.crops for layout in layouts]
            self.input.remember_prompt(inputs["input_ids"], inputs.get("attention_mask"))
        return inputs

    def _crops_per_run(self, input_ids: Tensor) -> list[int]:
        """Crops of each run of placeholders in the prompt last cut (``[B, L]``, runs counted row by
        row): images placed next to each other share one run, and so the text after it."""
        is_image = input_ids == self.image_token
        starts = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
        run = (starts.flatten().long().cumsum(0) - 1)[is_image.flatten()]
        lengths = torch.bincount(run).tolist() if run.numel() else []
        out, image = [], 0
        for length in lengths:
            crops = 0
            while length > 0 and image < len(self._prompt_crops):
                crops += self._prompt_crops[image]
                length -= self._prompt_crops[image] * self.plan.llm_input_visual
                image += 1
            out.append(crops)
        return out

    def _pack_reduced(self, original):
        """``pack_image_features`` for crops that hand on ``k`` tokens each: per image
        ``[crops x k, D]`` laid out by :meth:`.AnyresLayout.pack` (no unpadding, no newlines)."""
        def pack_image_features(image_features, image_sizes, *args, **kwargs):
            features = list(image_features)  # per image [crops, k, D]
            k = self.plan.llm_input_visual
            if not features or features[0].shape[1] != k or k == self.grid[0] * self.grid[1]:
                return original(image_features, image_sizes, *args, **kwargs)
            trace = self.input_trace if self.input is not None else self.vision_trace
            layouts = self._image_layouts(image_sizes)
            start, packed, state = 0, [], []
            for layout, crops in zip(layouts, features):
                if crops.shape[0] != layout.crops:
                    raise ValueError(f"an image of size {layout.tile_rows}x{layout.tile_cols} tiles has "
                                     f"{layout.crops} crops, got {crops.shape[0]}")
                rows = slice(start, start + layout.crops)
                start += layout.crops
                order, index = layout.pack(trace.positions[rows].to(crops.device))
                packed.append(crops.flatten(0, 1)[order])
                state.append((index, trace.sizes[rows].flatten().to(crops.device)[order]))
            self._packed = state
            lengths = host_to_device([x.shape[0] for x in packed], features[0].device)
            return packed, lengths

        return pack_image_features

    # -- inside the LLM -------------------------------------------------------------------------

    def _prompt_images(self) -> tuple[list[AnyresLayout], list[int]]:
        """The layouts of the last images seen and the placeholders each has in the prompt."""
        layouts = [self.layout(size) for size in self._sizes]
        counts = [layout.crops * self.plan.llm_input_visual if self._cuts else layout.full_tokens
                  for layout in layouts]
        return layouts, counts

    def _candidates(self, placeholders: Tensor) -> Tensor:
        """``[B, L]``: the placeholders that are patches (not newline tokens); also sorts the
        prompt's images into samples for :meth:`_schedule` and :meth:`_token_state`."""
        layouts, counts = self._prompt_images()
        per_row = placeholders.sum(dim=1).tolist()
        if sum(per_row) != sum(counts):
            raise ValueError(f"the prompt has {sum(per_row)} image placeholders but its {len(layouts)} image(s) "
                             f"need {sum(counts)} ({counts}); decoder-side reduction on {self.family_name} needs the "
                             f"image_sizes of the images in this prompt")
        self._rows, image = [], 0
        for count in per_row:
            mine = []
            while count > 0:
                mine.append(image)
                count -= counts[image]
                image += 1
            if count:
                raise ValueError("an image's placeholders run across two samples of the batch")
            self._rows.append(mine)
        if self._cuts:
            return placeholders
        patches = torch.cat([~layout.newlines() for layout in layouts]).to(placeholders.device)
        flat = placeholders.flatten()
        out = torch.zeros_like(flat)
        out[flat] = patches
        return out.view_as(placeholders)

    def _schedule(self, is_visual: Tensor) -> list[dict[int, int]]:
        layouts = [self.layout(size) for size in self._sizes]
        schedules = []
        for images in self._rows:
            removals: dict[int, int] = {}
            for image in images:
                for layer, removed in self.image_plan(layouts[image]).items():
                    removals[layer] = removals.get(layer, 0) + removed
            schedules.append(removals)
        return schedules

    def _token_state(self, b: int, counts: list[int], device) -> tuple[Tensor, Tensor]:
        """Per sample, the sizes and indices (:meth:`.AnyresLayout.patch_positions`) of its visual
        tokens in prompt order: the reduced crops' packing, or the model's own."""
        layouts = [self.layout(size) for size in self._sizes]
        width = max(counts)
        sizes = torch.ones(b, width, device=device)
        positions = torch.zeros(b, width, dtype=torch.long, device=device)
        packed = self._packed if self._cuts and len(self._packed) == len(layouts) else None
        for row, images in enumerate(self._rows):
            parts = [packed[i] if packed is not None else
                     (layouts[i].patch_positions(), torch.ones(layouts[i].patch_tokens)) for i in images]
            if parts:
                n = sum(p[0].numel() for p in parts)
                positions[row, :n] = torch.cat([p[0].to(device) for p in parts])
                sizes[row, :n] = torch.cat([p[1].to(device) for p in parts])
        return sizes, positions
