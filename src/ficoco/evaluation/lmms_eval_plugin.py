"""An `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ model backed by ficoco.

Installed with ficoco, it registers itself under the name ``ficoco`` (entry-point group
``lmms_eval.models``), so any lmms-eval task runs a local Hugging Face LLaVA checkpoint with a
token-reduction method attached::

    lmms-eval --model ficoco --model_args pretrained=PATH,method=ficoco-v,retain=192 \\
        --tasks pope --batch_size 8

``model_args``: ``pretrained`` (local checkpoint folder with its processor), ``method`` (a name from
``ficoco methods``, or ``vanilla``), ``retain`` (visual tokens per image, or a share such as
``0.25``), ``device``
(default ``cuda`` when there is one), ``dtype`` (``auto``, ``float16``, ``bfloat16``, ``float32``),
``batch_size``, ``max_new_tokens`` (used when the task does not set it), ``attn_implementation``,
``max_frames`` (most frames shown of a video; by default the model's convention, see
:mod:`ficoco.evaluation.video_frames`),
``prompt_format`` (``auto``, ``benchmark`` or ``model``: see
:mod:`ficoco.evaluation.prompt_format`; ``auto`` asks a model made by ``ficoco train-proxy`` the
bare questions, without the tasks' answer instructions); every other key is an option of the method (``start_layer=12``, ``lam=0.35``,
``schedule={"12":40,"13":40}``, ...). Under ``accelerate launch`` each process takes its share
of the samples on its own GPU.

The method is attached once, with :func:`ficoco.attach`, when the model is built, and detached by
:meth:`FicocoLlava.close` (lmms-eval calls :meth:`~FicocoLlava.clean` after the last request).
Prompts use the processor's chat template with one image, exactly as ``ficoco eval``
(:func:`ficoco.prompts.chat_prompt`), so both give the same answers. A task whose visuals are video
files (lmms-eval's ``activitynetqa``, ...) runs on a model that takes videos (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Video-LLaVA, LLaVA-OneVision, LLaVA-NeXT-Video): its frames are sampled and decoded as
``ficoco eval`` does (:mod:`ficoco.evaluation.model_inputs`), videos of different frame counts
answered in separate calls where the family needs one count per call; any other model refuses it
in one line.

Honest output: before answering, each task's prompts are checked against the tokenizer (mostly
unknown words: ``ValueError``; some: a warning). After answering, the share of answers each task's
parser could not read (no yes/no, no option letter, empty) is logged per task, loudly above 10%,
and kept in :attr:`FicocoLlava.unparsed`.

lmms-eval is not a dependency of ficoco; this module alone needs it. Its PyPI release requires
torchvision, OpenCV, wandb and more that this module never uses, so install it without them::

    pip install --no-deps lmms-eval==0.7.3 && pip install -e '.[lmms]'   # in a ficoco checkout
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import torch

from ..adapters import attach
from ..checkpoint import load_model, load_processor, resolve_device
from ..methods import get_method
from ..prompts import chat_prompt
from .formats.videos import VIDEO_EXTENSIONS, VideoFile
from .model_inputs import read_frames, to_model, video_inputs
from .prompt_format import bare_question, check_task_prompts, resolve_prompt_format
from .report import UNPARSED_WARN_SHARE
from .tasks import answer_format, is_unparsed
from .video_frames import frame_groups

INSTALL_HINT = ("pip install --no-deps lmms-eval==0.7.3, then ficoco's 'lmms' extra "
                "(pip install -e '.[lmms]' in a ficoco checkout)")
#: the name lmms-eval knows this model by (``--model ficoco``)
MODEL_NAME = "ficoco"


def manifest():
    """The entry point lmms-eval loads (``[project.entry-points."lmms_eval.models"]`` in
    pyproject.toml). Defined before lmms-eval is imported below: importing it may load the entry
    points, and so this module, again while it is still half imported."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.FicocoLlava", aliases=("ficoco_llava",))


try:
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(
        f"ficoco's lmms-eval plugin needs lmms-eval and a few of its dependencies ({err}). "
        f"Install them with: {INSTALL_HINT}  (--no-deps: lmms-eval's full dependency list pulls "
        "torchvision, OpenCV, wandb, ... which the plugin does not use)"
    ) from err

_VANILLA = ("vanilla", "none", "")
_UNPARSED_MEANS = MappingProxyType({"yes/no": "say neither yes nor no", "an option letter": "give no option letter",
                                   "any text": "are empty"})


def _as_schedule(value):
    """``schedule`` from the command line: a JSON object ``{"layer": removed, ...}``."""
    if isinstance(value, str):
        value = json.loads(value)
    return {int(layer): int(removed) for layer, removed in dict(value).items()}


class FicocoLlava(lmms):
    """A Hugging Face LLaVA checkpoint with a ficoco reduction method, as an lmms-eval model."""

    is_simple = True

    def __init__(self, pretrained: str, method: str = "vanilla", retain: int | float | None = None, *,
                 device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 max_new_tokens: int = 128, attn_implementation: str = "sdpa", max_batch_size=None,
                 prompt_format: str = "auto", max_frames: int | None = None, **method_options) -> None:
        super().__init__()
        method = "vanilla" if method is None else str(method).lower()
        if method in _VANILLA:
            method = "vanilla"
            if retain is not None or method_options:
                raise ValueError(f"method=vanilla takes no retain or method options (got retain={retain}, "
                                 f"{method_options})")
        # build the method before loading weights: a bad name or option fails at once
        if "schedule" in method_options:
            method_options["schedule"] = _as_schedule(method_options["schedule"])
        if retain is not None:  # a count, or a share of each image's tokens (0.25: Qwen-VL's varied sizes)
            method_options["retain"] = float(retain) if "." in str(retain) else int(retain)
        self.method = None if method == "vanilla" else get_method(method, **method_options)
        if not (dtype == "auto" or isinstance(dtype, torch.dtype) or isinstance(getattr(torch, str(dtype), None),
                                                                                 torch.dtype)):
            raise ValueError(f"dtype must be auto, float16, bfloat16 or float32; got {dtype!r}")
        if str(batch_size).lower().startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the ficoco model; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.max_frames = None if max_frames in (None, "", "None") else int(max_frames)
        self.pretrained = str(pretrained)
        self.method_name, self.retain = method, retain
        self.prompt_format = resolve_prompt_format(str(prompt_format), self.pretrained)
        #: ``{task: (unparsed answers, answers)}`` over every ``generate_until`` call so far
        self.unparsed: dict[str, tuple[int, int]] = {}
        self._checked_tasks: set[str] = set()

        self._rank, self._world_size = 0, 1
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:  # data parallel: one model per process, samples sharded by lmms-eval
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            self._device = torch.device(f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available()
                                        else "cpu")
        else:
            self._device = resolve_device(device)
        self.accelerator = accelerator

        torch_dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
        self.processor = load_processor(self.pretrained)
        self._model = load_model(self.pretrained, dtype=torch_dtype, device=self._device,
                                 attn_implementation=attn_implementation)
        self.processor.tokenizer.padding_side = "left"
        self.handle = attach(self._model, self.method) if self.method is not None else None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "FicocoLlava":
        """As lmms-eval's, except that a key given in ``model_args`` wins over the same key from the
        command line's own flags (``--batch_size`` always passes its default of 1)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- what lmms-eval reads -------------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach the method: the model is the original again."""
        handle, self.handle = getattr(self, "handle", None), None
        if handle is not None:
            handle.remove()

    def clean(self) -> None:
        """Called by lmms-eval after the last request: detach, then free the model."""
        self.close()
        super().clean()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- prompts and inputs ---------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        """The sample's images (RGB) or video files, as ``doc_to_visual`` gives them."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        out = []
        for visual in visuals:
            if isinstance(visual, str) and visual.lower().endswith(VIDEO_EXTENSIONS):
                path = Path(visual)
                out.append(VideoFile(path.name, [path.parent]))
            elif hasattr(visual, "convert"):
                out.append(visual.convert("RGB"))
            else:
                raise NotImplementedError(f"the ficoco model takes images and video files, got a "
                                          f"{type(visual).__name__} (audio tasks are not supported)")
        return out

    def _prompt(self, context: str, images: int) -> str:
        """``context`` as the user turn about ``images`` images, ending in the assistant's cue
        (without the task's answer instruction when ``prompt_format`` is ``model``)."""
        if self.prompt_format == "model":
            context = bare_question(context)
        token = getattr(self.processor, "image_token", "<image>")
        in_text = context.count(token)
        if images == 1 and in_text == 0:
            return chat_prompt(self.processor, context)  # the path ``ficoco eval`` takes
        if in_text not in (0, images):
            raise ValueError(f"the prompt names {in_text} images but the sample has {images}")
        if getattr(self.processor, "chat_template", None):
            content = [] if in_text else [{"type": "image"}] * images
            conversation = [{"role": "user", "content": [*content, {"type": "text", "text": context}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return "USER: " + ("" if in_text else f"{token}\n" * images) + f"{context} ASSISTANT:"

    def _video_batches(self, contexts: Sequence[str], videos: Sequence[VideoFile], tasks: Sequence[str],
                       doc_ids: Sequence[int]) -> list[tuple[list[int], dict]]:
        """The inputs of one question per video, the frames read as ``ficoco eval`` reads them:
        ``(positions, inputs)`` per processor call (one per frame count where the family needs it)."""
        model_type = getattr(self._model.config, "model_type", None)
        frames = [read_frames(video, model_type, task, str(doc_id), self.max_frames)
                  for video, task, doc_id in zip(videos, tasks, doc_ids)]
        questions = [bare_question(c) if self.prompt_format == "model" else c for c in contexts]
        return [(group, to_model(video_inputs(self.processor, model_type, [questions[i] for i in group],
                                              [frames[i] for i in group]), self._model))
                for group in frame_groups(model_type, [len(f.indices) for f in frames])]

    def _inputs(self, prompts: Sequence[str], images: list) -> dict:
        batch = self.processor(images=images or None, text=list(prompts), return_tensors="pt", padding=True)
        batch = {k: v.to(self._device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self._model.dtype)
        return batch

    # -- requests -------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Answers, batched by generation settings and image count, in the order of ``requests``.
        Greedy unless the task asks for sampling; the text is cut at the first ``until`` string."""
        from tqdm.auto import tqdm

        args = [request.args for request in requests]
        self._check_prompts(args)
        keys = [json.dumps(a[1], sort_keys=True, default=str) for a in args]
        order = sorted(range(len(args)), key=lambda i: (keys[i], -len(args[i][0]), i))  # long first: OOM early
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="ficoco answering")
        start = 0
        while start < len(order):
            chunk = [order[start]]
            while (len(chunk) < self.batch_size and start + len(chunk) < len(order)
                   and keys[order[start + len(chunk)]] == keys[chunk[0]]):
                chunk.append(order[start + len(chunk)])
            start += len(chunk)
            visuals = {i: self._visuals(args[i][2], args[i][4], args[i][5], args[i][3]) for i in chunk}
            by_count: dict[object, list[int]] = {}
            for i in chunk:  # decoder-side reductions need the same number of images in every row
                kind = "video" if any(isinstance(v, VideoFile) for v in visuals[i]) else len(visuals[i])
                by_count.setdefault(kind, []).append(i)
            answered: list[tuple[list[int], list[str]]] = []
            for kind, rows in by_count.items():
                if kind == "video":
                    if any(len(visuals[i]) != 1 for i in rows):
                        raise NotImplementedError("the ficoco model takes one video per question, without images")
                    for group, batch in self._video_batches([args[i][0] for i in rows], [visuals[i][0] for i in rows],
                                                            [args[i][4] for i in rows], [args[i][3] for i in rows]):
                        part = [rows[g] for g in group]
                        answered.append((part, self._generate([args[i][0] for i in part], [], args[part[0]][1],
                                                              batch=batch)))
                else:
                    answered.append((rows, self._generate([args[i][0] for i in rows], [visuals[i] for i in rows],
                                                          args[rows[0]][1])))
            for rows, texts in answered:
                for i, text in zip(rows, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
            bar.update(len(chunk))
        bar.close()
        self._report_unparsed(args, results)
        return results

    def _check_prompts(self, args) -> None:
        """Refuse (``ValueError``) a task whose prompts the tokenizer mostly cannot read, warn
        about one with some unknown words; each task once, before any answer is generated."""
        from loguru import logger
        from types import SimpleNamespace

        by_task: dict[str, list] = {}
        for a in args:
            if a[4] not in self._checked_tasks:
                question = bare_question(a[0]) if self.prompt_format == "model" else a[0]
                by_task.setdefault(a[4], []).append(SimpleNamespace(question=question))
        check_task_prompts(self.tokenizer, by_task, warn=lambda line: logger.warning(f"ficoco: {line}"))
        self._checked_tasks.update(by_task)

    def _report_unparsed(self, args, answers: Sequence[str]) -> None:
        """Count, per task, the answers its parser could not read; log each task's share, as a
        warning above :data:`~ficoco.evaluation.report.UNPARSED_WARN_SHARE`."""
        from loguru import logger

        counts: dict[str, list[int]] = {}
        for a, text in zip(args, answers):
            count = counts.setdefault(a[4], [0, 0])
            count[0] += is_unparsed(a[4], text)
            count[1] += 1
        for task, (bad, total) in counts.items():
            before = self.unparsed.get(task, (0, 0))
            self.unparsed[task] = (before[0] + bad, before[1] + total)
            bad, total = self.unparsed[task]
            share = bad / total
            line = (f"ficoco: {task}: {bad} of {total} answers ({100 * share:.1f}%) cannot be parsed: they "
                    f"{_UNPARSED_MEANS[answer_format(task)]}")
            if share > UNPARSED_WARN_SHARE:
                logger.warning(f"{line}: more than {100 * UNPARSED_WARN_SHARE:.0f}%, so the task's score measures "
                               f"the answer format, not the model")
            else:
                logger.info(line)

    @torch.inference_mode()
    def _generate(self, contexts: Sequence[str], visuals: Sequence[list], gen_kwargs: dict | None, *,
                  batch: dict | None = None) -> list[str]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                   "do_sample": do_sample, "num_beams": int(gen_kwargs.get("num_beams") or 1)}
        if do_sample:
            options["temperature"] = temperature if temperature > 0 else 1.0
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        if batch is None:  # images (a video batch comes built)
            prompts = [self._prompt(context, len(images)) for context, images in zip(contexts, visuals)]
            batch = self._inputs(prompts, [image for images in visuals for image in images])
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = self._model.generate(**batch, pad_token_id=pad, **options)
        texts = self.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [_cut(text, until).strip() for text in texts]

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log P(continuation | image(s), context), whether greedy decoding gives it)`` per request,
        one request at a time. The continuation's logits are read from the end of the sequence, which
        every method leaves in place (reductions only remove visual tokens)."""
        from tqdm.auto import tqdm

        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="ficoco log-likelihoods"):
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(continuation, list):
                continuation = continuation[0]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            if any(isinstance(v, VideoFile) for v in images):
                raise NotImplementedError("the ficoco model scores log-likelihoods of image tasks only, not videos")
            prompt = self._prompt(context, len(images))
            context_length = self._inputs([prompt], images)["input_ids"].shape[1]
            batch = self._inputs([prompt + str(continuation)], images)
            ids = batch["input_ids"]
            n = ids.shape[1] - context_length
            if n <= 0:
                raise ValueError(f"continuation {continuation!r} adds no token to the prompt")
            logits = self._model(**batch).logits[:, -n - 1:-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            wanted = ids[:, -n:].to(logprobs.device)
            score = logprobs.gather(-1, wanted[..., None]).sum()
            out.append((float(score), bool((logprobs.argmax(-1) == wanted).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the ficoco model answers single-turn tasks only (generate_until, loglikelihood)")


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text

