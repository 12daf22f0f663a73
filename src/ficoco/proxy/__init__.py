"""Proxy data for training and evaluating a small LLaVA-architecture model.

:mod:`ficoco.proxy.scenes`: procedural 336x336 scenes of coloured shapes and words, with six
question families (attribute, counting, existence, spatial, text, multiple choice), an unbounded
on-the-fly ``train`` split and fixed, versioned ``validation`` / ``test`` splits.
:mod:`ficoco.proxy.easyvqa`: a reader for the real easy-VQA dataset (``pip install easy-vqa``).
"""

from .easyvqa import EasyVQASample, easy_vqa_answers, load_easy_vqa, load_image, split_easy_vqa_train
from .scenes import (
    ANSWER_WORDS, DATASET_VERSION, FAMILIES, FAMILY_FUNCTIONS, FINGERPRINTS, IMAGE_SIZE, PATCH_SIZE, PUNCTUATION,
    QUESTION_WORDS, SPLITS, VOCABULARY, Example, NoQuestion, Sample, Scene, SceneObject, SplitSpec,
    attribute_question, choice_question, counting_question, example_at, existence_question, family_at,
    family_balance, generate_scene, iter_examples, make_split, render, rng_for, spatial_question,
    split_fingerprint, text_question, tokenize,
)

__all__ = [
    "ANSWER_WORDS", "DATASET_VERSION", "FAMILIES", "FAMILY_FUNCTIONS", "FINGERPRINTS", "IMAGE_SIZE", "PATCH_SIZE",
    "PUNCTUATION", "QUESTION_WORDS", "SPLITS", "VOCABULARY", "EasyVQASample", "Example", "NoQuestion", "Sample",
    "Scene", "SceneObject", "SplitSpec", "attribute_question", "choice_question", "counting_question",
    "easy_vqa_answers", "example_at", "existence_question", "family_at", "family_balance", "generate_scene",
    "iter_examples", "load_easy_vqa", "load_image", "make_split", "render", "rng_for", "spatial_question",
    "split_easy_vqa_train", "split_fingerprint", "text_question", "tokenize",
]
