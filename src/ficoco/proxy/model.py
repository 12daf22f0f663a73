"""The proxy model's architecture, tokenizer and processor (issue 4).

A Hugging Face ``LlavaForConditionalGeneration`` that mirrors LLaVA-1.5's structure at small
width: a CLIP vision tower at 336 px with patch 14 (576 patches + [CLS]) and 24 layers, features
from layer -2, a two-layer GELU projector, and a small Llama decoder deep enough that decoder-side
start layers (FastV's 2, FiCoCo-L's 5) fall inside it. Its tokenizer is word-level over the
dataset's closed vocabulary and its processor has a chat template, so the model loads and runs
through exactly the ``from_pretrained`` path a real checkpoint takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE_WORDS = ("user", "assistant", ":")  # the words CHAT_TEMPLATE adds around each turn
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} "
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


@dataclass(frozen=True)
class ProxyShape:
    """Widths and depths of the proxy model (LLaVA-1.5 geometry, small widths). The defaults come
    to about 9.5M parameters, under 20 MB of fp16 safetensors."""

    vision_layers: int = 24
    vision_hidden: int = 128
    vision_heads: int = 4
    vision_mlp: int = 512
    llm_layers: int = 8
    llm_hidden: int = 224
    llm_heads: int = 4
    llm_kv_heads: int = 4
    llm_mlp: int = 576


def word_level_tokenizer(words: Iterable[str], visual_tokens: Mapping[str, str] = MappingProxyType({"image_token": "<image>"})):
    """A fast word-level tokenizer: lower-case, splits on whitespace and punctuation; special
    tokens first (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3), then the words in sorted order,
    then ``visual_tokens`` (``{attribute name: token}``, e.g. LLaVA's ``image_token: <image>``),
    which the tokenizer exposes as attributes (``tokenizer.image_token``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS[:4])}
    for word in sorted({w.lower() for w in words} | set(TEMPLATE_WORDS)):
        if word not in vocab and word not in SPECIAL_TOKENS and word not in visual_tokens.values():
            vocab[word] = len(vocab)
    for token in visual_tokens.values():
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(token, "isolated") for token in visual_tokens.values()),
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens=dict(visual_tokens))
    tokenizer.add_special_tokens({"additional_special_tokens": list(visual_tokens.values())})
    return tokenizer


def proxy_processor(words: Iterable[str]):
    """A ``LlavaProcessor``: CLIP preprocessing at 336 px, the word-level tokenizer, a chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = word_level_tokenizer(words)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


def proxy_config(tokenizer, shape: ProxyShape = ProxyShape()):
    """A ``LlavaConfig`` for ``shape`` whose vocabulary and special ids come from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=336, patch_size=14, projection_dim=shape.vision_hidden)
    text = LlamaConfig(hidden_size=shape.llm_hidden, intermediate_size=shape.llm_mlp,
                       num_hidden_layers=shape.llm_layers, num_attention_heads=shape.llm_heads,
                       num_key_value_heads=shape.llm_kv_heads, vocab_size=len(tokenizer),
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=True)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_seq_length=576, tie_word_embeddings=True)


def parameter_count(config) -> int:
    """Parameters of a model built from ``config`` (built on the meta device, no memory used)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
