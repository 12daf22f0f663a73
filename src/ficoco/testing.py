"""A tiny random LLaVA with LLaVA-1.5's geometry, for tests and examples that cannot download weights.

CLIP at 336 px with patch 14 (576 patches + [CLS]), 24 encoder layers, features from layer -2, a
small Llama decoder with grouped-query attention. Weights are random; the geometry is real.
"""

from __future__ import annotations

import torch


def tiny_llava_config(
    *,
    vision_layers: int = 24,
    llm_layers: int = 8,
    vision_hidden: int = 32,
    llm_hidden: int = 64,
    vocab_size: int = 96,
    image_token_id: int = 95,
    attn_implementation: str = "sdpa",
):
    """A :class:`transformers.LlavaConfig` with real CLIP-336 geometry and tiny widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=336, patch_size=14, projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=llm_hidden, intermediate_size=2 * llm_hidden, num_hidden_layers=llm_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=576,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(seed: int = 0, **config_options):
    """A :class:`transformers.LlavaForConditionalGeneration` with random weights, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_llava_config(**config_options)
    model = LlavaForConditionalGeneration(config)
    # random init leaves attention nearly uniform; sharper weights make scores informative
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    return model.eval()


def tiny_llava_processor(image_token_id: int = 95):
    """A processor for :func:`tiny_llava`: the proxy model's word-level tokenizer and chat template
    over a few words, padded with filler words so that ``<image>`` gets ``image_token_id``."""
    from .proxy.model import proxy_processor

    words = {"user", "assistant", ":", "what", "is", "the", "color", "of", "shape", "how", "many", "are", "there",
             "?", "a", "an", "red", "green", "blue", "yes", "no", "circle", "square", "triangle", "image", "in"}
    filler = (f"word{i}" for i in range(image_token_id))
    while len(words) < image_token_id - 4:  # 4 special tokens come first, <image> last
        words.add(next(filler))
    processor = proxy_processor(sorted(words))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_id
    return processor
