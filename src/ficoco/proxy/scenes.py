"""Procedural 336x336 scenes with question-answer pairs, deterministic by seed.

A :class:`Scene` holds 2-5 non-overlapping shapes, each in its own colour (some of them small,
about two CLIP patches wide) and, in about half the scenes, a word in large capital letters.
:func:`render` draws it; six question families ask about it, each mirroring one kind of benchmark the paper reports:

==============  ==============================================================  ================
family          templates                                                        like
==============  ==============================================================  ================
``attribute``   what color is the {shape}? / what shape is the {color} object?  GQA
                / what size is the {color} {shape}?
``counting``    how many {shape}s / {size} objects / objects are there?         counting
                (answers ``zero`` ... ``five``)
``existence``   is there a {desc} in the image? / does the image contain a      POPE
                {desc}?  (balanced yes/no, absent objects include adversarial
                colour-shape and size-colour-shape combinations)
``spatial``     is the {a} left of / right of / above / below the {b}? and      spatial
                which shape is left of / ... the {b}?
``text``        what word is written in the image? / what does the text say?   TextVQA
                / is the word {w} written in the image? / how many letters are
                in the word?
``choice``      which shape is {color}? / which color is the {shape}? / how     ScienceQA,
                many {shape}s are there? / what word is written in the image?   MMBench
                followed by "A. .. B. .. C. .. D. .. answer with the letter."
==============  ==============================================================  ================

Every question is unambiguous for its scene: objects are named by the shortest description
that picks out exactly one of them, spatial relations are asked only between objects whose boxes
do not overlap along the asked axis, and a family that cannot ask a clean question of a scene
raises :class:`NoQuestion`, after which :func:`example_at` draws a new scene.

Splits: sample ``i`` of a split is a pure function of ``(split seed, i)``
(:func:`example_at`), through numpy's ``Generator(PCG64)`` seeded with
``SeedSequence([seed, i])``; the scene, question and answer use only ``integers`` and ``random``
of that generator. ``train`` is unbounded and generated on the fly; ``validation`` and ``test``
are fixed by :data:`SPLITS` and checked against :data:`FINGERPRINTS`. Families are balanced in
blocks of six consecutive indices (each block holds every family once, in a seeded order).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DATASET_VERSION = "ficoco-proxy-2"

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24 x 24 patches

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = MappingProxyType({
    "circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
    "diamond": "diamonds",
})
COLORS = MappingProxyType({  # well separated from each other and from every background
    "red": (215, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (240, 220, 20),
    "green": (40, 160, 60),
    "cyan": (30, 190, 205),
    "blue": (35, 70, 215),
    "purple": (135, 50, 180),
    "pink": (240, 120, 190),
})
BACKGROUNDS = MappingProxyType({
    "white": (255, 255, 255),
    "gray": (222, 222, 222),
    "beige": (242, 233, 210),
    "sky": (222, 234, 246),
})
TEXT_COLOR = (20, 20, 20)  # near-black, a colour no object has
SIZES = ("small", "medium", "large")
SIZE_RANGES = MappingProxyType({"small": (20, 28), "medium": (38, 54), "large": (66, 90)})  # side in px, inclusive
SIZE_WEIGHTS = (0.4, 0.35, 0.25)
WORDS = (
    "cat", "dog", "sun", "map", "cup", "hat", "key", "pen", "bus", "owl", "fox", "egg",
    "bird", "fish", "lamp", "moon", "ship", "frog", "kite", "leaf", "rose", "tree", "wolf", "bell", "book",
    "apple", "bread", "chair", "clock", "house", "horse", "mouse", "plant", "snake",
)
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
OPTION_LETTERS = ("A", "B", "C", "D")
FAMILIES = ("attribute", "counting", "existence", "spatial", "text", "choice")
RELATIONS = ("left of", "right of", "above", "below")

MIN_OBJECTS, MAX_OBJECTS = 2, 5
WORD_PROBABILITY = 0.5
WORD_HEIGHT = (24, 36)  # cap height of the rendered word in px, inclusive (about 2-2.5 patches)
WORD_ASPECT = 0.85  # box width per letter / cap height
MARGIN = 4  # px between any box and the image border
GAP = 6  # px between any two boxes

# the templates below are also the source of QUESTION_WORDS: keep them in sync with the families
_TEMPLATE_TEXT = (
    "what color is the ? what shape is the object ? what size is the ?",
    "how many are there ? objects",
    "is there a an in the image ? does the image contain",
    "is the left of right of above below the ? which shape is",
    "what word is written in the image ? what does the text say ? is the word written in the image ?",
    "how many letters are in the word ?",
    "which shape is ? which color is the ? how many are there ? what word is written in the image ?",
    "A . B . C . D . answer with the letter .",
)
PUNCTUATION = ("?", ".")

_TOKEN = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks of ``text``: ``"is it? A. x"`` -> ``["is", "it", "?", "A", ".", "x"]``."""
    return _TOKEN.findall(text)


ANSWER_WORDS: tuple[str, ...] = tuple(sorted(
    {"yes", "no", *SHAPES, *COLORS, *SIZES, *COUNT_WORDS, *WORDS, *OPTION_LETTERS}
))
"""Every answer any family can give (each a single word)."""

QUESTION_WORDS: tuple[str, ...] = tuple(sorted(
    {w for t in _TEMPLATE_TEXT for w in tokenize(t) if w not in PUNCTUATION}
    | {*SHAPES, *PLURALS.values(), *COLORS, *SIZES, *COUNT_WORDS, *WORDS}
))
"""Every word (punctuation aside, see :data:`PUNCTUATION`) any question can contain."""

VOCABULARY: tuple[str, ...] = tuple(sorted(set(ANSWER_WORDS) | set(QUESTION_WORDS) | set(PUNCTUATION)))
"""Question words, answer words and punctuation: enough for a closed word-level tokenizer."""


# ----------------------------------------------------------------------------------------- data


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; covers [x0, x1) x [y0, y1)


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``bbox`` is the square cell it is drawn in, ``center`` that cell's centre."""

    shape: str
    color: str
    size: str
    bbox: Box
    center: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.bbox
        object.__setattr__(self, "center", ((x0 + x1) / 2, (y0 + y1) / 2))

    @property
    def side(self) -> int:
        return self.bbox[2] - self.bbox[0]

    def describe(self, *attributes: str) -> str:
        """The words for ``attributes`` in English order, e.g. ``("size", "color", "shape")``."""
        return " ".join(getattr(self, a) for a in ("size", "color", "shape") if a in attributes)


@dataclass(frozen=True)
class Scene:
    """Objects on a background (plain, or textured by :func:`render`), with an optional word (lower
    case; drawn in capitals)."""

    objects: tuple[SceneObject, ...]
    background: str
    word: str | None = None
    word_box: Box | None = None

    def to_dict(self) -> dict:
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "bbox": list(o.bbox)} for o in self.objects
            ],
            "background": self.background, "word": self.word,
            "word_box": None if self.word_box is None else list(self.word_box),
        }


@dataclass(frozen=True)
class Sample:
    """One question about a scene. For ``choice`` questions ``options`` lists the options in order
    (they are also written into ``question``) and ``answer`` is a letter."""

    question: str
    answer: str
    family: str
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Example:
    """A scene with its question: sample ``index`` of the split seeded ``seed``."""

    scene: Scene
    sample: Sample
    seed: int
    index: int

    @property
    def question(self) -> str:
        return self.sample.question

    @property
    def answer(self) -> str:
        return self.sample.answer

    @property
    def family(self) -> str:
        return self.sample.family

    @property
    def options(self) -> tuple[str, ...] | None:
        return self.sample.options

    def image(self, textured: bool = False) -> Image.Image:
        return render(self.scene, textured=textured)


class NoQuestion(Exception):
    """A family cannot ask an unambiguous question about this scene."""


# ------------------------------------------------------------------------------- randomness
# only Generator.integers and Generator.random, whose streams are the most stable across numpy versions


def rng_for(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` of split ``seed`` (``stream`` separates independent uses)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, stream])))


def _pick(rng: np.random.Generator, items: Sequence):
    if not items:
        raise NoQuestion("nothing to choose from")
    return items[int(rng.integers(len(items)))]


def _shuffled(rng: np.random.Generator, items: Sequence) -> list:
    out = list(items)
    for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
        j = int(rng.integers(i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def _weighted(rng: np.random.Generator, items: Sequence, weights: Sequence[float]):
    u, total = float(rng.random()) * sum(weights), 0.0
    for item, w in zip(items, weights):
        total += w
        if u < total:
            return item
    return items[-1]


# ----------------------------------------------------------------------------------- scenes


def _apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(rng: np.random.Generator, width: int, height: int, taken: list[Box], tries: int = 60) -> Box | None:
    for _ in range(tries):
        x0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - width + 1))
        y0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - height + 1))
        box = (x0, y0, x0 + width, y0 + height)
        if all(_apart(box, other, GAP) for other in taken):
            return box
    return None


def generate_scene(rng: np.random.Generator, *, with_word: bool | None = None, n_objects: int | None = None) -> Scene:
    """A random scene: ``n_objects`` (default 2-5) non-overlapping shapes, with a word when
    ``with_word`` (default: with probability :data:`WORD_PROBABILITY`).

    Every object has its own colour (as in Sort-of-CLEVR), so a colour names one object and the
    model can find it by a single lookup; shapes are drawn from a per-scene pool of 2-6, so that
    repeated shapes (for counting) and unique ones (for naming) both occur often."""
    if with_word is None:
        with_word = bool(rng.random() < WORD_PROBABILITY)
    if n_objects is None:
        n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    background = _pick(rng, tuple(BACKGROUNDS))
    shape_pool = _shuffled(rng, SHAPES)[: int(rng.integers(2, len(SHAPES) + 1))]
    colors = _shuffled(rng, tuple(COLORS))  # object k gets colours[k]: no colour repeats
    taken: list[Box] = []
    word = word_box = None
    if with_word:
        word = _pick(rng, WORDS)
        height = int(rng.integers(WORD_HEIGHT[0], WORD_HEIGHT[1] + 1))
        word_box = _place(rng, round(WORD_ASPECT * height * len(word)), height, taken)
        taken.append(word_box)  # the first box always fits
    objects = []
    for k in range(n_objects):
        size = _weighted(rng, SIZES, SIZE_WEIGHTS)
        lo, hi = SIZE_RANGES[size]
        side = int(rng.integers(lo, hi + 1))
        box = _place(rng, side, side, taken)
        shape, color = _pick(rng, shape_pool), colors[k]
        if box is not None:  # practically always; a crowded scene just gets one object fewer
            taken.append(box)
            objects.append(SceneObject(shape, color, size, box))
    if len(objects) < MIN_OBJECTS:
        return generate_scene(rng, with_word=with_word, n_objects=n_objects)
    return Scene(tuple(objects), background, word, word_box)


# ---------------------------------------------------------------------------------- render


def shape_polygon(shape: str, bbox: Box) -> list[tuple[float, float]]:
    """The outline of ``shape`` (not circle) inside ``bbox``, as polygon vertices in pixels."""
    x0, y0, x1, y1 = bbox
    x1, y1 = x1 - 1, y1 - 1  # last pixel inside the cell
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a = r / 3  # arms a third of the side wide
        return [
            (cx - a, y0), (cx + a, y0), (cx + a, cy - a), (x1, cy - a), (x1, cy + a), (cx + a, cy + a),
            (cx + a, y1), (cx - a, y1), (cx - a, cy + a), (x0, cy + a), (x0, cy - a), (cx - a, cy - a),
        ]
    if shape == "star":
        cy = y0 + r * 1.1  # a five-pointed star's bounding box is taller above its centre than below
        points = []
        for k in range(10):
            radius = r * 1.05 if k % 2 == 0 else r * 0.42
            angle = np.pi * (k / 5 - 0.5)
            points.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
        return points
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=1)
def _font():
    try:
        return ImageFont.load_default(size=96), True  # Pillow >= 10.1 with FreeType: scalable Aileron
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: an 11 px bitmap font
        return ImageFont.load_default(), False


@functools.lru_cache(maxsize=4096)
def _word_mask(word: str, width: int, height: int) -> Image.Image:
    """``word`` in capitals, its ink cropped and stretched to ``width x height``, as an L mask."""
    font, scalable = _font()
    text = word.upper()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, fill=255, font=font)
    canvas = canvas.crop(canvas.getbbox())
    # downscaling the large scalable glyphs anti-aliases them; the bitmap font is only ever upscaled
    resample = Image.Resampling.LANCZOS if scalable else Image.Resampling.NEAREST
    return canvas.resize((width, height), resample)


def background_texture(scene: Scene) -> np.ndarray:
    """``[IMAGE_SIZE, IMAGE_SIZE, 3]`` uint8: the scene's background colour with a texture, as natural
    images have, where a flat background leaves background patches nothing but their position.

    Smooth shading (four plane waves with periods of 40-200 px, +-12 levels each, slightly
    different per channel), 24-48 soft blobs of lighter or darker tone (+-18 levels) and pixel
    noise (sd 3). Everything stays light (at least about 150 per channel), far from the object
    colours and the near-black text. Seeded by the scene's own description, so the split seeds
    and every question stay as they are."""
    digest = hashlib.sha256(json.dumps(scene.to_dict(), sort_keys=True).encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))
    low = IMAGE_SIZE // 4  # the smooth parts are drawn at a quarter of the size, then upsampled
    y, x = (np.mgrid[0:low, 0:low].astype(np.float32) + 0.5) * (IMAGE_SIZE / low)
    smooth = np.zeros((3, low, low), np.float32)
    for _ in range(4):
        angle, period, phase = rng.random() * np.pi, 40 + rng.random() * 160, rng.random() * 2 * np.pi
        wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
        smooth += (12 * (0.8 + 0.4 * rng.random(3))).astype(np.float32)[:, None, None] * wave
    for _ in range(int(rng.integers(24, 49))):
        cx, cy = rng.random(2) * IMAGE_SIZE
        rx, ry = 6 + rng.random(2) * 30
        smooth += np.float32(rng.uniform(-18, 18)) * np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))
    field = np.stack([np.asarray(Image.fromarray(channel, "F").resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                       Image.Resampling.BILINEAR))
                      for channel in smooth], axis=-1)
    field += rng.normal(0, 3, field.shape).astype(np.float32)
    base = np.asarray(BACKGROUNDS[scene.background], np.float32)
    return np.clip(base + field, 0, 255).astype(np.uint8)


def render(scene: Scene, textured: bool = False) -> Image.Image:
    """The scene as a 336x336 RGB image (deterministic: same scene, same bytes), on its plain
    background or, with ``textured``, on :func:`background_texture`."""
    if textured:
        image = Image.fromarray(background_texture(scene), "RGB")
    else:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        x0, y0, x1, y1 = obj.bbox
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon(shape_polygon(obj.shape, obj.bbox), fill=fill)
    if scene.word is not None:
        x0, y0, x1, y1 = scene.word_box
        image.paste(TEXT_COLOR, scene.word_box, _word_mask(scene.word, x1 - x0, y1 - y0))
    return image


# ----------------------------------------------------------------------------- descriptions


_REFERENCE_ORDER = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def _matches(obj: SceneObject, attributes: Sequence[str], values: Sequence[str]) -> bool:
    return all(getattr(obj, a) == v for a, v in zip(attributes, values))


def unique_reference(scene: Scene, obj: SceneObject,
                     choices: Sequence[tuple[str, ...]] = _REFERENCE_ORDER) -> str | None:
    """The first description in ``choices`` (attribute tuples, shortest first) that matches ``obj``
    and no other object of ``scene``; None if there is none."""
    for attributes in choices:
        values = [getattr(obj, a) for a in attributes]
        if sum(_matches(o, attributes, values) for o in scene.objects) == 1:
            return obj.describe(*attributes)
    return None


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# --------------------------------------------------------------------------------- families


def attribute_question(scene: Scene, rng: np.random.Generator) -> Sample:
    """GQA-like: the colour, shape or size of one uniquely described object."""
    kinds = _shuffled(rng, ("color", "shape", "size"))
    for kind in kinds:
        candidates = []
        for obj in scene.objects:
            if kind == "color":
                ref = unique_reference(scene, obj, choices=(("shape",), ("size", "shape")))
                question = f"what color is the {ref}?"
            elif kind == "shape":
                ref = unique_reference(scene, obj, choices=(("color",), ("size", "color")))
                question = f"what shape is the {ref} object?"
            else:
                ref = unique_reference(scene, obj, choices=(("color", "shape"),))
                question = f"what size is the {ref}?"
            if ref is not None:
                candidates.append(Sample(question, getattr(obj, kind), "attribute"))
        if candidates:
            return _pick(rng, candidates)
    raise NoQuestion("no object can be named without the asked attribute")


def _count_questions(scene: Scene) -> list[tuple[str, int]]:
    """Every counting question that can be asked of ``scene`` (present or absent categories)."""
    objs = scene.objects
    out = [("how many objects are there?", len(objs))]
    out += [(f"how many {PLURALS[s]} are there?", sum(o.shape == s for o in objs)) for s in SHAPES]
    out += [(f"how many {z} objects are there?", sum(o.size == z for o in objs)) for z in SIZES]
    return out  # no per-colour counts: colours do not repeat, so they would be existence questions


def counting_question(scene: Scene, rng: np.random.Generator) -> Sample:
    """How many objects, or objects of a shape or size; zero for about one in seven."""
    questions = _count_questions(scene)
    zero = [q for q in questions if q[1] == 0]
    if rng.random() < 1 / 7 and zero:
        question, count = _pick(rng, zero)
    else:  # pick a count first so larger counts are not drowned by the many ones
        counts = sorted({n for _, n in questions if n > 0})
        count = _pick(rng, counts)
        question, count = _pick(rng, [q for q in questions if q[1] == count])
    return Sample(question, COUNT_WORDS[count], "counting")


def _present(scene: Scene, attributes: Sequence[str], values: Sequence[str]) -> bool:
    return any(_matches(o, attributes, values) for o in scene.objects)


def existence_question(scene: Scene, rng: np.random.Generator) -> Sample:
    """POPE-like yes/no: half ask about a present object, half about an absent one; absent ones are
    random (shape or colour-shape not in the scene), or adversarial (colour and shape both present
    but not together, or a colour-shape present only in another size)."""
    template = _pick(rng, ("is there {} in the image?", "does the image contain {}?"))
    if rng.random() < 0.5:
        obj = _pick(rng, scene.objects)
        phrase = obj.describe(*_pick(rng, (("shape",), ("color", "shape"), ("size", "color", "shape"))))
        return Sample(template.format(_article(phrase)), "yes", "existence")
    colors = sorted({o.color for o in scene.objects}, key=list(COLORS).index)
    shapes = sorted({o.shape for o in scene.objects}, key=SHAPES.index)
    pools = {
        "random": [s for s in SHAPES if s not in shapes]
        + [f"{c} {s}" for c in COLORS for s in SHAPES if not _present(scene, ("color", "shape"), (c, s))],
        "adversarial": [f"{c} {s}" for c in colors for s in shapes if not _present(scene, ("color", "shape"), (c, s))],
        "size": [
            f"{z} {o.color} {o.shape}" for o in scene.objects for z in SIZES
            if not _present(scene, ("size", "color", "shape"), (z, o.color, o.shape))
        ],
    }
    kind = _pick(rng, [k for k in ("random", "adversarial", "size") if pools[k]])
    phrase = _pick(rng, sorted(set(pools[kind])))
    return Sample(template.format(_article(phrase)), "no", "existence")


_AXIS = {"left of": (0, True), "right of": (0, False), "above": (1, True), "below": (1, False)}


def _relation(a: SceneObject, b: SceneObject, relation: str) -> bool | None:
    """Whether ``a`` is ``relation`` ``b``: True/False when their boxes are disjoint along the
    relation's axis, None (not asked) when they overlap along it."""
    axis, before = _AXIS[relation]
    if a.bbox[axis + 2] <= b.bbox[axis]:
        return before
    if b.bbox[axis + 2] <= a.bbox[axis]:
        return not before
    return None


def spatial_question(scene: Scene, rng: np.random.Generator) -> Sample:
    """Yes/no about the relation of two uniquely named objects (balanced), or, when exactly one
    object lies on one side of a reference object, which shape it is."""
    refs = {i: unique_reference(scene, o) for i, o in enumerate(scene.objects)}
    objs = scene.objects
    if rng.random() < 0.3:
        candidates = []
        for j, b in enumerate(objs):
            if refs[j] is None:
                continue
            for relation in RELATIONS:
                sides = [_relation(a, b, relation) for i, a in enumerate(objs) if i != j]
                if sides.count(True) == 1 and None not in sides:
                    a = next(a for i, a in enumerate(objs) if i != j and _relation(a, b, relation))
                    candidates.append(Sample(f"which shape is {relation} the {refs[j]}?", a.shape, "spatial"))
        if candidates:
            return _pick(rng, candidates)
    want = bool(rng.random() < 0.5)
    candidates = [
        (i, j, relation)
        for i in refs for j in refs for relation in RELATIONS
        if i != j and refs[i] is not None and refs[j] is not None and _relation(objs[i], objs[j], relation) is want
    ]
    if not candidates:
        raise NoQuestion("no pair of named objects is clearly apart")
    i, j, relation = _pick(rng, candidates)
    return Sample(f"is the {refs[i]} {relation} the {refs[j]}?", "yes" if want else "no", "spatial")


def text_question(scene: Scene, rng: np.random.Generator) -> Sample:
    """TextVQA-like, about the scene's word: read it (60%), verify a same-length candidate (30%,
    balanced yes/no) or count its letters (10%)."""
    word = scene.word
    if word is None:
        raise NoQuestion("no text in the scene")
    u = rng.random()
    if u < 0.6:
        question = _pick(rng, ("what word is written in the image?", "what does the text say?"))
        return Sample(question, word, "text")
    if u < 0.9:
        if rng.random() < 0.5:
            return Sample(f"is the word {word} written in the image?", "yes", "text")
        other = _pick(rng, [w for w in WORDS if len(w) == len(word) and w != word])
        return Sample(f"is the word {other} written in the image?", "no", "text")
    return Sample("how many letters are in the word?", COUNT_WORDS[len(word)], "text")


def choice_question(scene: Scene, rng: np.random.Generator) -> Sample:
    """ScienceQA/MMBench-like: four lettered options, answer the letter (uniform over A-D)."""
    objs = scene.objects
    options: list[tuple[str, str, Sequence[str]]] = []  # question, correct option, option pool
    for color in COLORS:
        owners = [o for o in objs if o.color == color]
        if len(owners) == 1:
            options.append((f"which shape is {color}?", owners[0].shape, SHAPES))
    for obj in objs:
        ref = unique_reference(scene, obj, choices=(("shape",), ("size", "shape")))
        if ref is not None:
            options.append((f"which color is the {ref}?", obj.color, tuple(COLORS)))
    for shape in sorted({o.shape for o in objs}, key=SHAPES.index):
        count = sum(o.shape == shape for o in objs)
        options.append((f"how many {PLURALS[shape]} are there?", COUNT_WORDS[count], COUNT_WORDS[1:]))
    if scene.word is not None:
        options.append(("what word is written in the image?", scene.word, [w for w in WORDS if len(w) == len(scene.word)]))
    # one template kind first, so the word and count questions are not drowned by the many colour ones
    kinds = sorted({q.split()[0] + " " + q.split()[1] for q, _, _ in options})
    kind = _pick(rng, kinds)
    question, correct, pool = _pick(rng, [o for o in options if o[0].startswith(kind)])
    distractors = _shuffled(rng, [p for p in pool if p != correct])[:3]
    position = int(rng.integers(4))
    choices = (*distractors[:position], correct, *distractors[position:])
    listed = " ".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, choices))
    return Sample(f"{question} {listed} answer with the letter.", OPTION_LETTERS[position], "choice", choices)


FAMILY_FUNCTIONS: MappingProxyType[str, Callable[[Scene, np.random.Generator], Sample]] = MappingProxyType({
    "attribute": attribute_question,
    "counting": counting_question,
    "existence": existence_question,
    "spatial": spatial_question,
    "text": text_question,
    "choice": choice_question,
})


# ----------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSpec:
    seed: int
    size: int | None  # None: unbounded, generated on the fly


SPLITS: MappingProxyType[str, SplitSpec] = MappingProxyType({
    "train": SplitSpec(seed=20_250_001, size=None),
    "validation": SplitSpec(seed=20_250_002, size=2000),
    "test": SplitSpec(seed=20_250_003, size=2000),
})

FINGERPRINTS = MappingProxyType({  # split_fingerprint(make_split(name)) for DATASET_VERSION
    "validation": "6afe5b9018dfed7d7e236e5717295771d05bf0ecc3a16de2e6523336519e4a6c",
    "test": "2adbcce50d00111298c4b5e1cc2127bdec34c8021f337c940d47b79d79b7b085",
})


def family_at(seed: int, index: int) -> str:
    """The family of sample ``index``: each block of six indices holds every family once."""
    block, slot = divmod(index, len(FAMILIES))
    return _shuffled(rng_for(seed, block, stream=1), FAMILIES)[slot]


def example_at(seed: int, index: int, family: str | None = None) -> Example:
    """Sample ``index`` of the split seeded ``seed``: a pure function of its arguments."""
    family = family or family_at(seed, index)
    rng = rng_for(seed, index)
    ask = FAMILY_FUNCTIONS[family]
    for _ in range(1000):
        scene = generate_scene(rng, with_word=True if family == "text" else None)
        try:
            return Example(scene, ask(scene, rng), seed, index)
        except NoQuestion:
            continue
    raise RuntimeError(f"no {family} question after 1000 scenes (seed {seed}, index {index})")


def follow_up_questions(example: Example, count: int) -> list[Sample]:
    """Up to ``count`` more questions about ``example``'s scene, from a family order shuffled by
    the example's own seed and index (a stream its question did not use); families that cannot ask
    a clean question of the scene are skipped, and no question repeats."""
    rng = rng_for(example.seed, example.index, stream=2)
    asked, out = {example.question}, []
    for family in _shuffled(rng, FAMILIES) * (count // len(FAMILIES) + 2):  # a family may ask several times
        if len(out) == count:
            break
        try:
            sample = FAMILY_FUNCTIONS[family](example.scene, rng)
        except NoQuestion:
            continue
        if sample.question not in asked:
            asked.add(sample.question)
            out.append(sample)
    return out


def _seed_of(split: str | int) -> int:
    return SPLITS[split].seed if isinstance(split, str) else int(split)


def iter_examples(split: str | int = "train", start: int = 0, stop: int | None = None) -> Iterator[Example]:
    """Examples ``start, start+1, ...`` (up to ``stop``, else forever) of a split name or seed."""
    seed, index = _seed_of(split), start
    while stop is None or index < stop:
        yield example_at(seed, index)
        index += 1


def make_split(name: str, size: int | None = None, seed: int | None = None) -> list[Example]:
    """The first ``size`` examples of split ``name`` (default size and seed from :data:`SPLITS`)."""
    spec = SPLITS[name]
    size = spec.size if size is None else size
    if size is None:
        raise ValueError(f"split {name!r} is unbounded: pass size, or use iter_examples / example_at")
    return list(iter_examples(spec.seed if seed is None else seed, 0, size))


def split_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 over the scenes, questions and answers (not the pixels) of ``examples``."""
    digest = hashlib.sha256()
    for ex in examples:
        record = [ex.seed, ex.index, ex.scene.to_dict(), ex.question, ex.answer, ex.family, ex.options]
        digest.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def family_balance(examples: Sequence[Example]) -> dict[str, float]:
    """The fraction of ``examples`` in each family (every family listed)."""
    counts = Counter(ex.family for ex in examples)
    return {f: counts[f] / max(len(examples), 1) for f in FAMILIES}
