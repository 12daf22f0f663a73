"""The proxy dataset (ficoco.proxy): determinism, unambiguous answers recomputed independently from
the scene, balance, geometry of small objects and text, splits, vocabularies, and the easy-VQA reader."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from collections import Counter

import numpy as np
import pytest

from ficoco.proxy import scenes
from ficoco.proxy.scenes import (
    ANSWER_WORDS, BACKGROUNDS, COLORS, FAMILIES, FINGERPRINTS, GRID, PATCH_SIZE, PUNCTUATION, QUESTION_WORDS, SHAPES, SIZES, SPLITS,
    TEXT_COLOR, example_at, family_balance, generate_scene, iter_examples, make_split, render, rng_for,
    split_fingerprint, tokenize,
)

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
PLURAL = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}


@pytest.fixture(scope="module")
def test_split():
    return make_split("test")


@pytest.fixture(scope="module")
def validation_split():
    return make_split("validation")


@pytest.fixture(scope="module")
def train_examples():
    return list(iter_examples("train", 0, 600))


def _image_bytes(example) -> bytes:
    return render(example.scene).tobytes()


# ---------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_identical_images_and_qa():
    for seed, index in [(SPLITS["train"].seed, 0), (SPLITS["train"].seed, 12345), (SPLITS["test"].seed, 7), (3, 2)]:
        a, b = example_at(seed, index), example_at(seed, index)
        assert a == b
        assert _image_bytes(a) == _image_bytes(b)
    assert [e.sample for e in iter_examples("validation", 40, 46)] == [e.sample for e in make_split("validation", 46)[40:]]
    assert example_at(SPLITS["train"].seed, 5) != example_at(SPLITS["train"].seed, 6)


def test_fixed_splits_match_their_fingerprints(test_split, validation_split):
    assert scenes.DATASET_VERSION
    assert split_fingerprint(validation_split) == FINGERPRINTS["validation"]
    assert split_fingerprint(test_split) == FINGERPRINTS["test"]


def test_pixels_of_the_first_test_images_are_stable(test_split):
    # pixels also depend on Pillow's rasteriser; the QA fingerprint above does not
    digest = hashlib.sha256(b"".join(_image_bytes(e) for e in test_split[:24])).hexdigest()
    assert digest == hashlib.sha256(b"".join(_image_bytes(e) for e in make_split("test", 24))).hexdigest()
    assert render(test_split[0].scene).size == (336, 336) and render(test_split[0].scene).mode == "RGB"


# --------------------------------------------------- answers recomputed from the scene alone


def _select(scene, phrase: str) -> list:
    """Objects matching every size / colour / shape word of ``phrase`` ("object(s)" matches all)."""
    objects = list(scene.objects)
    for word in phrase.split():
        if word in ("object", "objects"):
            continue
        word = PLURAL.get(word, word)
        key = "size" if word in SIZES else "color" if word in COLORS else "shape" if word in SHAPES else None
        assert key is not None, f"unexpected word {word!r} in {phrase!r}"
        objects = [o for o in objects if getattr(o, key) == word]
    return objects


def _the(scene, phrase: str):
    found = _select(scene, phrase)
    assert len(found) == 1, f"'the {phrase}' names {len(found)} objects"
    return found[0]


def _side(a, b, relation: str) -> bool:
    """a relation b, asserting that a's and b's boxes do not overlap along the axis."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
    first, second = {"left of": ((ax1, bx0), (bx1, ax0)), "right of": ((bx1, ax0), (ax1, bx0)),
                     "above": ((ay1, by0), (by1, ay0)), "below": ((by1, ay0), (ay1, by0))}[relation]
    if first[0] <= first[1]:
        return True
    assert second[0] <= second[1], f"boxes {a.bbox} and {b.bbox} overlap along the axis of {relation!r}"
    return False


def _solve(scene, question: str) -> str:
    yes_no = {True: "yes", False: "no"}
    rules = [
        (r"what color is the (.+)\?", lambda m: _the(scene, m[1]).color),
        (r"which color is the (.+)\?", lambda m: _the(scene, m[1]).color),
        (r"what shape is the (.+) object\?", lambda m: _the(scene, m[1]).shape),
        (r"which shape is (\w+)\?", lambda m: _the(scene, m[1]).shape),
        (r"what size is the (.+)\?", lambda m: _the(scene, m[1]).size),
        (r"how many letters are in the word\?", lambda m: NUMBERS[len(scene.word)]),
        (r"how many (.+) are there\?", lambda m: NUMBERS[len(_select(scene, m[1]))]),
        (r"(?:is there|does the image contain) an? (.+?)(?: in the image)?\?", lambda m: yes_no[bool(_select(scene, m[1]))]),
        (r"is the (.+?) (left of|right of|above|below) the (.+)\?",
         lambda m: yes_no[_side(_the(scene, m[1]), _the(scene, m[3]), m[2])]),
        (r"which shape is (left of|right of|above|below) the (.+)\?", lambda m: _which(scene, m[2], m[1])),
        (r"(?:what word is written in the image|what does the text say)\?", lambda m: scene.word),
        (r"is the word (\w+) written in the image\?", lambda m: yes_no[m[1] == scene.word]),
    ]
    for pattern, answer in rules:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(match)
    raise AssertionError(f"no rule for {question!r}")


def _which(scene, phrase: str, relation: str) -> str:
    reference = _the(scene, phrase)
    others = [o for o in scene.objects if o is not reference]
    hits = [o for o in others if _side(o, reference, relation)]
    assert len(hits) == 1
    return hits[0].shape


def _check(example) -> None:
    scene, question, answer = example.scene, example.question, example.answer
    if example.family == "choice":
        match = re.fullmatch(r"(.+\?) A\. (\w+) B\. (\w+) C\. (\w+) D\. (\w+) answer with the letter\.", question)
        assert match, question
        options = match.groups()[1:]
        assert options == example.options and len(set(options)) == 4
        correct = _solve(scene, match[1])
        assert options.count(correct) == 1
        assert answer == "ABCD"[options.index(correct)]
    else:
        assert example.options is None
        assert _solve(scene, question) == answer, question
    if example.family == "text":
        assert scene.word is not None


def test_every_answer_follows_from_the_scene(test_split, train_examples):
    for example in itertools.chain(test_split, train_examples):
        _check(example)


def test_every_family_asks_every_template_kind(test_split):
    starts = Counter((e.family, " ".join(e.question.split()[:2])) for e in test_split)
    kinds = {f: {k for (g, k) in starts if g == f} for f in FAMILIES}
    assert {"what color", "what shape", "what size"} <= kinds["attribute"]
    assert {"is the", "which shape"} <= kinds["spatial"]
    assert {"what word", "what does", "is the", "how many"} <= kinds["text"]
    assert {"which shape", "which color", "how many", "what word"} <= kinds["choice"]
    assert {"is there", "does the"} <= kinds["existence"]


# ------------------------------------------------------------------------------------ balance


def test_families_are_balanced(test_split):
    balance = family_balance(test_split)
    assert set(balance) == set(FAMILIES)
    for fraction in balance.values():
        assert abs(fraction - 1 / len(FAMILIES)) < 0.005
    # every block of six consecutive indices holds each family once
    for block in range(0, 60, 6):
        assert sorted(e.family for e in test_split[block:block + 6]) == sorted(FAMILIES)


def test_yes_no_questions_are_balanced(test_split):
    for family in ("existence", "spatial", "text"):
        answers = Counter(e.answer for e in test_split if e.family == family and e.answer in ("yes", "no"))
        n = sum(answers.values())  # a fair coin stays within three standard deviations of n / 2
        assert abs(answers["yes"] - n / 2) <= 3 * (n / 4) ** 0.5, (family, answers)
    existence = [e for e in test_split if e.family == "existence"]
    assert all(e.answer in ("yes", "no") for e in existence)
    # absent objects include adversarial ones: a colour and a shape that are both there but not together,
    # or a colour-shape that is there only in another size
    absent = [e for e in existence if e.answer == "no"]
    words = [set(tokenize(e.question)) for e in absent]
    adversarial = [
        w for e, w in zip(absent, words)
        if any(o.color in w for o in e.scene.objects) and any(o.shape in w for o in e.scene.objects)
    ]
    other_size = [
        w for e, w in zip(absent, words) if w & set(SIZES) and any({o.color, o.shape} <= w for o in e.scene.objects)
    ]
    assert len(adversarial) > 0.5 * len(absent) and len(other_size) > 0.2 * len(absent)


def test_choice_letters_and_counts_are_spread(test_split):
    letters = Counter(e.answer for e in test_split if e.family == "choice")
    assert set(letters) == set("ABCD") and min(letters.values()) > 0.18 * sum(letters.values())
    counts = Counter(e.answer for e in test_split if e.family == "counting")
    assert set(counts) >= {"zero", "one", "two", "three", "four", "five"}


# ------------------------------------------------------------------------------------ geometry


def _scenes(n=300, seed=11):
    return [generate_scene(rng_for(seed, i)) for i in range(n)]


def test_objects_do_not_overlap_and_stay_inside():
    for scene in _scenes():
        assert 2 <= len(scene.objects) <= 6
        boxes = [o.bbox for o in scene.objects] + ([scene.word_box] if scene.word else [])
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 336 and 0 <= y0 < y1 <= 336
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        for obj in scene.objects:
            assert obj.center == ((obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2)


def test_small_objects_are_at_most_two_patches_and_drawn_inside_their_box():
    sides = {size: [] for size in SIZES}
    for scene in _scenes():
        pixels = np.asarray(render(scene)).astype(int)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert x1 - x0 == y1 - y0
            sides[obj.size].append(x1 - x0)
            top, left = max(y0 - 3, 0), max(x0 - 3, 0)  # the box and a 3 px ring around it
            ink = np.all(pixels[top:y1 + 3, left:x1 + 3] == COLORS[obj.color], axis=-1)
            inside = ink[y0 - top:y1 - top, x0 - left:x1 - left]
            # drawn, fills a fair part of its box, and nothing of it outside (other objects are farther)
            assert inside.sum() > 0.3 * (x1 - x0) ** 2
            ys, xs = np.nonzero(inside)
            assert xs.max() - xs.min() + 1 >= 0.8 * (x1 - x0) and ys.max() - ys.min() + 1 >= 0.8 * (y1 - y0)
            assert ink.sum() == inside.sum()
    assert sides["small"] and max(sides["small"]) <= 2 * 14 and min(sides["small"]) >= 14
    assert max(sides["small"]) < min(sides["medium"]) and max(sides["medium"]) < min(sides["large"])


def test_palette_is_well_separated():
    colors = list(COLORS.values())
    for a, b in itertools.combinations(colors + [TEXT_COLOR], 2):
        assert np.linalg.norm(np.subtract(a, b)) > 60
    for a in colors + [TEXT_COLOR]:
        for b in BACKGROUNDS.values():
            assert np.linalg.norm(np.subtract(a, b)) > 100


def test_textured_backgrounds_change_only_the_background():
    """``render(scene, textured=True)``: deterministic; the objects drawn pixel for pixel as on the
    plain background; a background that varies from patch to patch but stays light, far from every
    object colour and the text."""
    palette = np.array(list(COLORS.values()) + [TEXT_COLOR])
    for scene in _scenes(n=30, seed=13):
        plain = np.asarray(render(scene)).astype(int)
        textured = np.asarray(render(scene, textured=True)).astype(int)
        assert np.array_equal(textured, np.asarray(render(scene, textured=True)))
        for obj in scene.objects:
            ink = np.all(plain == COLORS[obj.color], axis=-1)
            assert np.array_equal(textured[ink], plain[ink])
        background = np.all(plain == BACKGROUNDS[scene.background], axis=-1)
        pixels = textured[background]
        assert pixels.min() >= 120
        assert np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1).min() > 60
        patch_means = [textured[r:r + PATCH_SIZE, c:c + PATCH_SIZE].mean()
                       for r in range(0, 336, PATCH_SIZE) for c in range(0, 336, PATCH_SIZE)
                       if background[r:r + PATCH_SIZE, c:c + PATCH_SIZE].all()]
        assert np.std(patch_means) > 2.0  # the plain background's is 0


def test_words_are_rendered_large_and_legibly():
    with_word = [generate_scene(rng_for(5, i), with_word=True) for i in range(60)]
    masks = {}
    for scene in with_word:
        x0, y0, x1, y1 = scene.word_box
        assert y1 - y0 >= 24  # capital height of almost two patches
        pixels = np.asarray(render(scene)).astype(int)
        dark = np.all(pixels < 110, axis=-1)
        inside = dark[y0:y1, x0:x1]
        assert 0.12 < inside.mean() < 0.7  # ink, but not a blob
        assert dark.sum() == inside.sum()  # no dark pixel outside the word
        columns = inside.any(axis=0)  # letters are separated by blank columns
        assert np.count_nonzero(np.diff(columns.astype(int)) == 1) >= len(scene.word) - 1
        masks[(scene.word, x1 - x0, y1 - y0)] = inside
    # different words in boxes of the same size are drawn differently
    same_size = [(k, m) for k, m in masks.items()]
    for (ka, ma), (kb, mb) in itertools.combinations(same_size, 2):
        if ka[1:] == kb[1:] and ka[0] != kb[0]:
            assert (ma != mb).mean() > 0.05
    assert all(generate_scene(rng_for(5, i), with_word=False).word is None for i in range(10))


# -------------------------------------------------------------------------------------- splits


def test_split_sizes_seeds_and_disjointness(test_split, validation_split):
    assert len(test_split) == SPLITS["test"].size == 2000
    assert len(validation_split) == SPLITS["validation"].size == 2000
    assert SPLITS["train"].size is None
    assert len({spec.seed for spec in SPLITS.values()}) == len(SPLITS)
    assert {(e.seed, e.index) for e in test_split}.isdisjoint((e.seed, e.index) for e in validation_split)
    assert [e.index for e in test_split] == list(range(2000))

    def key(example):
        return json.dumps(example.scene.to_dict(), sort_keys=True)

    assert {key(e) for e in test_split}.isdisjoint(key(e) for e in validation_split)
    assert {key(e) for e in test_split}.isdisjoint(key(e) for e in iter_examples("train", 0, 2000))
    with pytest.raises(ValueError):
        make_split("train")
    assert len(make_split("train", 5)) == 5


# ------------------------------------------------------------------------------- vocabularies


def test_answers_and_question_words_are_in_the_closed_vocabularies(test_split, validation_split, train_examples):
    question_words, answer_words = set(QUESTION_WORDS), set(ANSWER_WORDS)
    for example in itertools.chain(test_split, validation_split, train_examples):
        assert example.answer in answer_words
        for token in tokenize(example.question):
            assert token in question_words or token in PUNCTUATION, (token, example.question)
        # the same words with a plain split on whitespace and punctuation
        assert set(re.split(r"[\s?.]+", example.question)) - {""} <= question_words
    assert all(" " not in w for w in answer_words)
    assert len(answer_words) < 100 and len(question_words) < 150


def test_tokenize():
    assert tokenize("which shape is red? A. circle B. star answer with the letter.") == [
        "which", "shape", "is", "red", "?", "A", ".", "circle", "B", ".", "star", "answer", "with", "the",
        "letter", ".",
    ]


# ----------------------------------------------------------------------------------- easy-VQA


def test_easy_vqa_missing_package_names_pip_install(monkeypatch):
    from ficoco.proxy import easyvqa

    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes `import easy_vqa` raise ImportError
    with pytest.raises(ImportError, match="pip install easy-vqa"):
        easyvqa.load_easy_vqa("test")
    with pytest.raises(ValueError):
        easyvqa.load_easy_vqa("validation")


def test_easy_vqa_reader():
    pytest.importorskip("easy_vqa")
    from pathlib import Path

    from ficoco.proxy.easyvqa import easy_vqa_answers, load_easy_vqa, load_image, split_easy_vqa_train

    train, test = load_easy_vqa("train"), load_easy_vqa("test")
    assert len(train) == 38575 and len(test) == 9673
    answers = easy_vqa_answers()
    assert len(answers) == 13 and {"yes", "no", "circle", "rectangle", "triangle"} <= set(answers)
    assert {s.answer for s in train} | {s.answer for s in test} <= set(answers)
    assert len({s.image_path for s in train}) == 4000 and len({s.image_path for s in test}) == 1000
    assert {s.image_path for s in train}.isdisjoint(s.image_path for s in test)
    assert all(Path(s.image_path).is_file() for s in test[:50])
    assert test[0].question.endswith("?")

    fit, validation = split_easy_vqa_train(train)
    assert len(fit) + len(validation) == len(train)
    assert {s.image_id for s in fit}.isdisjoint(s.image_id for s in validation)
    assert len({s.image_id for s in validation}) == 400

    for resample in ("bicubic", "nearest"):
        image = load_image(test[0].image_path, resample=resample)
        assert image.size == (336, 336) and image.mode == "RGB"
    from PIL import Image

    with Image.open(test[0].image_path) as original:
        colors = {tuple(c) for c in np.asarray(original.convert("RGB")).reshape(-1, 3)}
    nearest = np.asarray(load_image(test[0].image_path, resample="nearest")).reshape(-1, 3)
    assert {tuple(c) for c in nearest} <= colors
    assert load_image(test[0].image_path, size=64).size == (64, 64)


# ------------------------------------------------------------------------ training-side targets


def test_patch_words_cover_every_object_and_only_its_box():
    from ficoco.proxy.recipe import patch_words

    for example in make_split("validation", size=40):
        words = patch_words(example)
        assert len(words) == GRID * GRID
        for obj in example.scene.objects:
            owned = [i for i, w in enumerate(words) if w == (obj.color, obj.shape)]
            assert owned, f"{obj} owns no patch"
            x0, y0, x1, y1 = obj.bbox
            for i in owned:  # the patch centre of each owned patch lies in some object box of that kind
                cx, cy = (i % GRID) * PATCH_SIZE + 7, (i // GRID) * PATCH_SIZE + 7
                assert any(o.bbox[0] <= cx < o.bbox[2] and o.bbox[1] <= cy < o.bbox[3]
                           for o in example.scene.objects if (o.color, o.shape) == (obj.color, obj.shape))
        if example.scene.word:
            assert (example.scene.word,) in words
        described = sum(1 for w in words if w)
        assert described < GRID * GRID  # background patches stay empty


def test_follow_up_questions_are_deterministic_unique_and_about_the_same_scene():
    from ficoco.proxy.scenes import follow_up_questions

    example = example_at(SPLITS["train"].seed, 17)
    first = follow_up_questions(example, 5)
    assert first == follow_up_questions(example, 5) and 1 <= len(first) <= 5
    questions = [s.question for s in first]
    assert len(set(questions)) == len(questions) and example.question not in questions
    assert follow_up_questions(example, 2) == first[:2]
    assert {s.family for s in first} <= set(FAMILIES)


def test_mixed_training_stream_is_deterministic_and_interleaves_easy_vqa():
    pytest.importorskip("easy_vqa")
    from ficoco.proxy.easyvqa import load_easy_vqa, split_easy_vqa_train
    from ficoco.proxy.recipe import EASY_VQA_FAMILY, mixed_training_stream

    fit, _ = split_easy_vqa_train(load_easy_vqa("train"))
    stream, again = mixed_training_stream(fit, 4, 0, turns=3), mixed_training_stream(fit, 4, 0, turns=3)
    items = [stream(i) for i in range(8)]
    assert [x.family == EASY_VQA_FAMILY for x in items] == [False, False, False, True] * 2
    for i, item in enumerate(items):
        twin = again(i)
        assert (item.question, item.answer, item.turns) == (twin.question, twin.answer, twin.turns)
        assert len(item.turns) <= 2
    by_question = {(s.question, s.answer): s.image_id for s in fit}
    easy = items[3]
    image_ids = {s.image_id for s in fit if (s.question, s.answer) == (easy.question, easy.answer)}
    for question, answer in easy.turns:  # every later turn asks about an image the first question could be about
        assert (question, answer) in by_question
    assert image_ids
    single = mixed_training_stream([], 0, 0)(5)
    assert single.turns == () and single.family in FAMILIES


def test_training_stream_draws_textured_scenes_when_asked():
    from ficoco.proxy.recipe import mixed_training_stream

    plain, textured = mixed_training_stream([], 0, 0)(3), mixed_training_stream([], 0, 0, textured=True)(3)
    assert (plain.question, plain.answer) == (textured.question, textured.answer)
    assert textured.image.tobytes() == render(textured.example.scene, textured=True).tobytes()
    assert plain.image.tobytes() == render(plain.example.scene).tobytes() != textured.image.tobytes()
