"""Reader for the real easy-VQA dataset (the ``easy-vqa`` PyPI package, which ships its images).

easy-VQA: 64x64 PNGs of one coloured shape (circle, rectangle, triangle; 8 colours) on a white
background; 4000 train / 1000 test images, 38,575 / 9,673 questions, 13 answers (shapes, colours,
yes, no). The package (version 1.0) exposes::

    easy_vqa.get_train_questions() -> (questions: list[str], answers: list[str], image_ids: list[int])
    easy_vqa.get_test_questions()  -> same
    easy_vqa.get_train_image_paths() -> {image_id: absolute path of the PNG}
    easy_vqa.get_test_image_paths()  -> same
    easy_vqa.get_answers() -> list[str] of the 13 answers

The package has no validation split; :func:`split_easy_vqa_train` holds out whole train images.
"""

from __future__ import annotations

from types import MappingProxyType

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

SPLIT_NAMES = ("train", "test")
_MISSING = "easy-VQA needs the easy-vqa package: pip install easy-vqa"


def _package():
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError(_MISSING) from error
    return easy_vqa


@dataclass(frozen=True)
class EasyVQASample:
    image_path: str
    question: str
    answer: str
    image_id: int = -1


def load_easy_vqa(split: str) -> list[EasyVQASample]:
    """Every question of easy-VQA's ``"train"`` or ``"test"`` split, in the package's order."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"easy-VQA splits are {SPLIT_NAMES}, not {split!r}")
    package = _package()
    questions, answers, image_ids = getattr(package, f"get_{split}_questions")()
    paths = getattr(package, f"get_{split}_image_paths")()
    return [
        EasyVQASample(paths[image_id], question, answer, image_id)
        for question, answer, image_id in zip(questions, answers, image_ids)
    ]


def split_easy_vqa_train(samples: Sequence[EasyVQASample], every: int = 10
                         ) -> tuple[list[EasyVQASample], list[EasyVQASample]]:
    """``(fit, validation)``: validation holds every question of the images whose id is a multiple
    of ``every`` (400 of the 4000 train images by default), fit the rest; no image is in both."""
    fit = [s for s in samples if s.image_id % every != 0]
    validation = [s for s in samples if s.image_id % every == 0]
    return fit, validation


def easy_vqa_answers() -> list[str]:
    """The 13 possible answers, sorted (the package's ``answers.txt`` without blank lines)."""
    return sorted({a for a in _package().get_answers() if a})


def easy_vqa_question_words(samples: Sequence[EasyVQASample]) -> list[str]:
    """The sorted words (punctuation stripped) of the questions in ``samples``."""
    from .scenes import PUNCTUATION, tokenize

    return sorted({w for s in samples for w in tokenize(s.question) if w not in PUNCTUATION})


_RESAMPLE = MappingProxyType({"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST})


def load_image(path: str, size: int = 336, resample: str = "bicubic") -> Image.Image:
    """The image at ``path`` as RGB, resized from 64x64 to ``size x size``.

    Bicubic by default, the filter CLIP's preprocessing uses: flat colours stay exact inside the
    shape and edges become smooth over a pixel or two. ``resample="nearest"`` keeps every pixel one
    of the original colours, at the price of blocks 5 or 6 pixels wide (336 / 64 = 5.25)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        return image.resize((size, size), _RESAMPLE[resample]) if image.size != (size, size) else image
