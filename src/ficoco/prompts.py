"""The one place that turns a question into a LLaVA prompt with one image."""

from __future__ import annotations


def chat_prompt(processor, question: str) -> str:
    """``question`` about one image in the processor's own chat template, or in LLaVA-1.5's plain
    ``USER: <image>\\n... ASSISTANT:`` format when the processor has no template."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def follow_up_prompt(processor, question: str) -> str:
    """A later user turn (no image) ending in the assistant's cue, for multi-turn training text
    appended after an earlier answer and its end-of-sequence token."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {question} ASSISTANT:"
