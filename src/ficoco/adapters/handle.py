"""What every model family's attachment shares: the hooks it owns, detaching, the ``generate``
wrapper that shortens the prompt for encoder-side methods, and losses on the surviving positions.

A family (``adapters/llava.py``, ``adapters/qwen_vl.py``) subclasses :class:`ReductionHandle` and
says where its vision layers are, whether it has a [CLS], the patch grid of each image, where
visual tokens sit in the prompt and how positions are built.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from ..methods import Method
from .hooks import HookSet
from .language import LanguageSide

HANDLE_ATTRIBUTE = "_ficoco_handle"


class ReductionHandle:
    """A method attached to a model. Use as a context manager or call :meth:`remove`.

    Attributes:
        method: the method as it runs on this model (for a vision tower without [CLS], with its
            stand-ins: :meth:`ficoco.Method.without_cls`).
        vision_trace: what the encoder did to the last image batch (kept positions and sizes).
        kept_index: ``[B, L']`` original prompt column of each position of the last prefill's output
            (decoder-side methods; ``None`` otherwise); ``kept_valid`` says which are real tokens.
    """

    #: the family's name, as ``ficoco`` names it in messages
    family = "model"
    #: the forward arguments that carry pixels (a call with none of them has nothing to cut)
    pixel_inputs: tuple[str, ...] = ("pixel_values", "pixel_values_videos")

    def __init__(self, model: nn.Module, core: nn.Module, outer: nn.Module | None, method: Method, *,
                 record: bool) -> None:
        if getattr(model, HANDLE_ATTRIBUTE, None) is not None:
            raise RuntimeError("a ficoco method is already attached to this model; remove it first")
        self.model, self.core, self.outer, self.method, self.record = model, core, outer, method, record
        self.hooks = HookSet()
        self.vision = None
        self.input = None  # an InputSide (PackedInputSide on Qwen-VL), for methods that reduce the projected tokens
        self.language: LanguageSide | None = None
        self._stashed_labels: Tensor | None = None
        self._signatures = {id(m): inspect.signature(type(m).forward) for m in (core, outer) if m is not None}
        self._instance_wrappers: list[tuple[object, str]] = []

    def _adaptive_counts(self, items: str, model_name: str) -> bool:
        """Whether the method decides each image's count in the encoder (PruMerge without a
        budget), refused in one line where that cannot work: with a reduction after the encoder,
        which would need the count in advance, or on a transformers whose model cannot take the
        encoded ``items`` in place of the pixels (``mm_encoder_outputs``)."""
        method = self.method
        if method.vision is None or not method.vision.adaptive:
            return False
        if method.input is not None or method.language is not None:
            raise ValueError(f"{method.name} decides each image's count in the encoder; an LLM-input or decoder "
                             f"reduction after it would need that count in advance")
        if "mm_encoder_outputs" not in inspect.signature(type(self.core).forward).parameters:
            raise ValueError(f"{method.name} without a budget gives each {items} its own token count, which needs a "
                             f"transformers whose {model_name} takes mm_encoder_outputs; give retain=")
        return True

    def _attach(self) -> None:
        """Install the family's hooks (subclasses), removing everything again on failure."""
        try:
            self._install()
        except Exception:
            self.remove()
            raise
        setattr(self.model, HANDLE_ATTRIBUTE, self)

    def _install(self) -> None:
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------

    @property
    def vision_trace(self):
        return None if self.vision is None else self.vision.last

    @property
    def input_trace(self):
        """What the LLM-input reduction did to the last image batch (kept positions and sizes)."""
        return None if self.input is None else self.input.last

    @property
    def kept_index(self) -> Tensor | None:
        return None if self.language is None else self.language.kept_index

    @property
    def kept_valid(self) -> Tensor | None:
        return None if self.language is None else self.language.kept_valid

    @property
    def kept_dead(self) -> Tensor | None:
        """``[B, L']`` which output positions are dead rows (``None`` when none): see
        :mod:`ficoco.adapters.language`."""
        return None if self.language is None else self.language.kept_dead

    @property
    def language_steps(self) -> list:
        """``(layer, ReductionResult)`` of each decoder reduction of the last prefill (``record=True``)."""
        if self.language is None or self.language.seq is None:
            return []
        return list(self.language.seq.steps)

    def prepare_inputs(self, **inputs):
        """Cut the visual placeholders of processor outputs to what the encoder hands on. ``generate``
        and ``forward`` do this by themselves; call it to run a manual decoding loop whose attention
        mask must match the prefill length."""
        return self._rewrite(dict(inputs))

    def remove(self) -> None:
        """Detach: remove every hook and every instance-level wrapper."""
        self.hooks.remove()
        for owner, name in reversed(self._instance_wrappers):
            owner.__dict__.pop(name, None)
        self._instance_wrappers.clear()
        if getattr(self.model, HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, HANDLE_ATTRIBUTE)

    def __enter__(self) -> "ReductionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- instance-level wrappers (removed on detach) ----------------------------------------------

    def _wrap(self, owner: object, name: str, make) -> None:
        """Replace ``owner.name`` for this instance by ``make(original)``; :meth:`remove` undoes it."""
        original = getattr(owner, name)
        wrapper = functools.wraps(original)(make(original))
        owner.__dict__[name] = wrapper
        self._instance_wrappers.append((owner, name))

    def _encoder_state(self, images: int, n: int, device) -> tuple[Tensor, Tensor] | None:
        """Sizes and grid positions ``[images, n]`` of the tokens the encoder handed the projector,
        from its trace (``None`` when it did not hand on those)."""
        trace = self.vision_trace
        if trace is None or trace.sizes.shape != (images, n):
            return None
        return trace.sizes.to(device), trace.positions.to(device)

    # -- encoder-side: placeholders -------------------------------------------------------------

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        """Processor outputs with the visual placeholders cut to what the encoder hands on (families
        with encoder-side reduction override this)."""
        return inputs

    def _rewrite_model_inputs(self, module, args, kwargs):
        if not args and all(kwargs.get(name) is None for name in self.pixel_inputs):
            return None  # nothing to cut: decoding steps, text-only calls
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        bound.pop("self", None)
        extra = bound.pop("kwargs", {})
        rewritten = self._rewrite({**bound, **extra})
        return (), rewritten

    def _wrap_generate(self, outer: nn.Module) -> None:
        def make(original):
            def generate(*args, **kwargs):
                if args and isinstance(args[0], Tensor) and "input_ids" not in kwargs:
                    kwargs["input_ids"], args = args[0], args[1:]
                prompt = kwargs.get("input_ids")
                kwargs = self._rewrite(kwargs, default_side="left")
                out = original(*args, **kwargs)
                if prompt is None or kwargs.get("input_ids") is prompt:
                    return out
                # give back the caller's prompt in front of the new tokens, as without reduction
                cut_len = kwargs["input_ids"].shape[1]
                if isinstance(out, Tensor):
                    return torch.cat([prompt, out[:, cut_len:]], dim=1)
                out.sequences = torch.cat([prompt, out.sequences[:, cut_len:]], dim=1)
                return out

            return generate

        self._wrap(outer, "generate", make)

    # -- decoder-side: loss on the surviving positions ------------------------------------------

    def _install_loss_hooks(self) -> None:
        if self.outer is not None:
            self.hooks.pre(self.outer, self._stash_labels, with_kwargs=True)
            self.hooks.post(self.outer, self._loss_on_kept_tokens)

    def _stash_labels(self, module, args, kwargs):
        if kwargs.get("labels") is None:
            return None
        self._stashed_labels = kwargs.pop("labels")
        return args, kwargs

    def _loss_on_kept_tokens(self, module, args, output):
        labels, self._stashed_labels = self._stashed_labels, None
        if labels is None:
            return None
        kept = self.kept_index
        if kept is not None and output.logits.shape[1] != labels.shape[1]:
            labels = labels.gather(1, kept.to(labels.device))
            dead = self.kept_dead
            if dead is not None:  # rows kept only to keep the batch rectangular
                labels = labels.masked_fill(dead.to(labels.device), -100)
        output.loss = module.loss_function(logits=output.logits, labels=labels,
                                           vocab_size=module.config.text_config.vocab_size)
        return output
