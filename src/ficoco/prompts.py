"""The one place that turns a question into a prompt about its images (or a video) in the model's
chat template, and that checks whether a model's tokenizer can read the prompt at all."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


def chat_prompt(processor, question: str, images: int = 1) -> str:
    """``question`` about ``images`` images (placed before it, in order) in the processor's own chat
    template, or in LLaVA-1.5's plain ``USER: <image>\\n... ASSISTANT:`` format when the processor
    has no template."""
    if getattr(processor, "chat_template", None):
        parts = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    return "USER: " + "<image>\n" * images + f"{question} ASSISTANT:"


def video_chat_prompt(processor, question: str) -> str:
    """``question`` about one video (placed before it) in the processor's chat template. A template
    that knows only images (the Qwen proxy's) renders an image part, whose placeholder becomes the
    video's: Qwen's templates wrap both alike (``<|vision_start|>...<|vision_end|>``)."""
    video_token = getattr(processor, "video_token", None)
    if not getattr(processor, "chat_template", None) or video_token is None:
        raise ValueError(f"{type(processor).__name__} has no chat template with a video placeholder; it cannot be "
                         f"asked about a video")
    parts = [{"type": "video"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    if video_token in text:
        return text
    return chat_prompt(processor, question).replace(processor.image_token, video_token, 1)


def follow_up_prompt(processor, question: str) -> str:
    """A later user turn (no image) ending in the assistant's cue, for multi-turn training text
    appended after an earlier answer and its end-of-sequence token."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {question} ASSISTANT:"


#: share of unknown words above which a prompt is "mostly" outside the model's vocabulary
MOSTLY_UNKNOWN = 0.5
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class VocabularyCheck:
    """How much of some prompt text a tokenizer can represent.

    Attributes:
        words: words and punctuation marks looked at.
        unknown: the distinct ones the tokenizer turns into its unknown token, in order of appearance.
        unknown_count: how many of ``words`` (with repeats) are unknown.
    """

    words: int
    unknown: tuple[str, ...]
    unknown_count: int

    @property
    def share(self) -> float:
        return self.unknown_count / self.words if self.words else 0.0

    @property
    def mostly_unknown(self) -> bool:
        return self.share > MOSTLY_UNKNOWN

    def describe(self, limit: int = 8) -> str:
        """``"7 of 12 words (58%) are unknown to the tokenizer: 'answer', 'using', ..."``"""
        shown = ", ".join(repr(w) for w in self.unknown[:limit]) + (", ..." if len(self.unknown) > limit else "")
        return (f"{self.unknown_count} of {self.words} words ({100 * self.share:.0f}%) are unknown to the model's "
                f"tokenizer: {shown}")


def vocabulary_check(tokenizer, texts: Iterable[str]) -> VocabularyCheck:
    """Which words of ``texts`` the tokenizer maps to its unknown token.

    Sub-word tokenizers with byte fallback (Llama, Qwen) never produce an unknown token, so for
    them this reports nothing; a closed word-level vocabulary (the embedded proxy model's) shows
    which words the model has never seen. Each distinct word is encoded once."""
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [w for text in texts for w in _WORD.findall(text)]
    if unk is None:
        return VocabularyCheck(len(words), (), 0)
    verdict: dict[str, bool] = {}
    for word in dict.fromkeys(words):
        verdict[word] = unk in tokenizer(word, add_special_tokens=False)["input_ids"]
    unknown = tuple(w for w, bad in verdict.items() if bad)
    return VocabularyCheck(len(words), unknown, sum(verdict[w] for w in words))
