"""Tiny random models with real geometry (LLaVA-1.5, LLaVA-NeXT, Qwen-VL), for tests and examples
that cannot download weights.

CLIP at 336 px with patch 14 (576 patches + [CLS]), 24 encoder layers, features from layer -2, a
small Llama decoder with grouped-query attention. Weights are random; the geometry is real.
"""

from __future__ import annotations

import torch


def _sharpened(model, suffixes: tuple[str, ...] = ("q_proj.weight", "k_proj.weight"), *, skip: str | None = None):
    """``model`` in eval mode with its query/key weights (names ending in ``suffixes``, not
    containing ``skip``) scaled by 4: random init leaves attention nearly uniform, sharper weights
    make the scores methods read informative."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(suffixes) and (skip is None or skip not in name):
                param.mul_(4.0)
    return model.eval()


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
    return _sharpened(model)


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


# -- the LLaVA-NeXT family ------------------------------------------------------------------------

#: LLaVA-NeXT-7B's (llava-v1.6-vicuna-7b) anyres resolutions, ``[height, width]`` in pixels
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def tiny_llava_next_config(*, llm_layers: int = 8, attn_implementation: str = "sdpa", **options):
    """A :class:`transformers.LlavaNextConfig` with LLaVA-NeXT-7B's geometry at tiny widths: the
    tiny LLaVA's CLIP-336/14 tower (24 layers, features from layer -2, ``default`` strategy) and
    decoder, and LLaVA-NeXT-7B's :data:`LLAVA_NEXT_PINPOINTS`."""
    from transformers import LlavaNextConfig

    base = tiny_llava_config(llm_layers=llm_layers, attn_implementation=attn_implementation, **options)
    base.text_config.max_position_embeddings = 8192  # an image brings up to 2928 tokens
    config = LlavaNextConfig(
        vision_config=base.vision_config, text_config=base.text_config, image_token_id=base.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava_next(seed: int = 0, **config_options):
    """A :class:`transformers.LlavaNextForConditionalGeneration` with random weights, in eval mode."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(**config_options))
    return _sharpened(model)


def tiny_llava_next_processor(image_token_id: int = 95):
    """A ``LlavaNextProcessor`` for :func:`tiny_llava_next`: LLaVA-NeXT's anyres preprocessing
    (PIL backend) at 336 px with :data:`LLAVA_NEXT_PINPOINTS`, and the tiny LLaVA's word-level
    tokenizer and chat template, so that images of different sizes get their own token counts."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    words = tiny_llava_processor(image_token_id)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS])
    return LlavaNextProcessor(image_processor=images, tokenizer=words.tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=words.chat_template, image_token="<image>")


# -- the LLaVA-NeXT-Video family ---------------------------------------------------------------------


def tiny_llava_next_video_config(*, llm_layers: int = 8, vision_layers: int = 24, attn_implementation: str = "sdpa",
                                 video_token_id: int = 94):
    """A :class:`transformers.LlavaNextVideoConfig` with LLaVA-NeXT-Video-7B's geometry at tiny widths:
    :func:`tiny_llava_next_config`'s tower (CLIP-336/14, features from layer -2, ``default``
    strategy), decoder and pinpoints, and videos average-pooled 2x2 to 12 x 12 tokens per frame."""
    from transformers import LlavaNextVideoConfig

    base = tiny_llava_next_config(llm_layers=llm_layers, attn_implementation=attn_implementation)
    base.vision_config.num_hidden_layers = vision_layers
    config = LlavaNextVideoConfig(
        vision_config=base.vision_config, text_config=base.text_config, image_token_index=base.image_token_id,
        video_token_index=video_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
        spatial_pool_mode="average", spatial_pool_stride=2)
    config._attn_implementation = attn_implementation
    return config


def tiny_llava_next_video(seed: int = 0, **config_options):
    """A :class:`transformers.LlavaNextVideoForConditionalGeneration` with random weights, in eval mode."""
    from transformers import LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(tiny_llava_next_video_config(**config_options))
    return _sharpened(model)


# -- the LLaVA-OneVision family ----------------------------------------------------------------------

#: LLaVA-OneVision's (llava-onevision-qwen2-7b-ov) anyres resolutions: every ``[384 i, 384 j]``, i, j in 1..6
LLAVA_ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


def tiny_llava_onevision_config(*, llm_layers: int = 8, vision_layers: int = 26, attn_implementation: str = "sdpa",
                                vision_hidden: int = 32,
                                llm_hidden: int = 64, vocab_size: int = 96, image_token_id: int = 95,
                                video_token_id: int = 94):
    """A :class:`transformers.LlavaOnevisionConfig` with LLaVA-OneVision-7B's geometry at tiny widths:
    a SigLIP-384/14 tower (729 patches, no [CLS]; 26 layers by default, as OneVision keeps of
    SigLIP-so400m's 27) with features from layer -1 and the ``full`` strategy,
    :data:`LLAVA_ONEVISION_PINPOINTS`, ``anyres_max_9``, a Qwen2 decoder of the tiny LLaVA's widths."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    # OneVision's LLM is Qwen2 (biased query, key and value projections); the tiny LLaVA's widths
    text = Qwen2Config(hidden_size=llm_hidden, intermediate_size=2 * llm_hidden, num_hidden_layers=llm_layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=16384,  # an image brings up to 729 + 9 crops' worth of tokens
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers,
                                num_attention_heads=4, image_size=384, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", image_grid_pinpoints=[list(p) for p in LLAVA_ONEVISION_PINPOINTS],
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava_onevision(seed: int = 0, **config_options):
    """A :class:`transformers.LlavaOnevisionForConditionalGeneration` with random weights, in eval mode."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(**config_options))
    # the decoder only. Not the tower: SigLIP's own (xavier) init is ~7x CLIP's, its attention logits
    # already have a spread of ~1; 4x sharper they reach ~16 (near-argmax attention), where float32
    # rounding differences between eager and SDPA grow ~5x per layer (7e-3 after 16 layers, against
    # 3e-6 unsharpened).
    return _sharpened(model, skip="vision_tower")


def tiny_llava_onevision_image_processor():
    """OneVision's anyres image processor (PIL backend) at 384 px with :data:`LLAVA_ONEVISION_PINPOINTS`
    (``LlavaOnevisionProcessor`` itself also builds a video processor, which needs torchvision; the
    tiny LLaVA's tokenizer, :func:`tiny_llava_processor`, gives the text side)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                           image_grid_pinpoints=[list(p) for p in LLAVA_ONEVISION_PINPOINTS])


# -- the Qwen-VL family -----------------------------------------------------------------------------

#: the three Qwen-VL generations ficoco runs, by ``config.model_type``
QWEN_GENERATIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: token ids of the tiny Qwen-VL models (a 160-word vocabulary)
QWEN_TOKENS = {"pad": 0, "bos": 1, "eos": 2, "vision_start": 150, "vision_end": 151, "image": 152, "video": 153}
QWEN_VOCAB = 160


def qwen_patch_size(generation: str) -> int:
    """Qwen2-VL and Qwen2.5-VL use 14-pixel patches, Qwen3-VL 16-pixel ones."""
    return 16 if generation == "qwen3_vl" else 14


def tiny_qwen_config(generation: str, *, llm_layers: int = 8, vision_width: int = 32,
                     attn_implementation: str = "sdpa", llm_heads: tuple[int, int] = (2, 1)):
    """A Qwen-VL config with the family's real geometry at tiny widths.

    Real: patch size (14, or 16 for Qwen3-VL), temporal patch 2, 2x2 merge, tower depth (32, or 27),
    Qwen2.5-VL's 112-pixel windows and full-attention blocks 7/15/23/31, Qwen3-VL's DeepStack
    blocks 8/16/24 and learned 48x48 position grid, the LLM's M-RoPE sections (16/24/24, or
    interleaved 24/20/20) on 128-wide heads. Tiny: a 32-wide tower with 2 heads, an LLM of
    ``llm_layers`` layers with ``llm_heads`` = (query heads, key/value heads), 128 wide each
    (default 2 and 1: grouped-query attention, 256 wide).
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig, Qwen2VLConfig,
                              Qwen2VLTextConfig, Qwen2VLVisionConfig, Qwen3VLConfig, Qwen3VLTextConfig,
                              Qwen3VLVisionConfig)

    query_heads, kv_heads = llm_heads
    hidden, tokens = 128 * query_heads, QWEN_TOKENS
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=llm_layers,
                num_attention_heads=query_heads, num_key_value_heads=kv_heads, vocab_size=QWEN_VOCAB, max_position_embeddings=4096,
                pad_token_id=tokens["pad"], bos_token_id=tokens["bos"], eos_token_id=tokens["eos"])
    ids = dict(image_token_id=tokens["image"], video_token_id=tokens["video"],
               vision_start_token_id=tokens["vision_start"], vision_end_token_id=tokens["vision_end"])
    if generation == "qwen2_vl":
        vision = Qwen2VLVisionConfig(depth=32, embed_dim=vision_width, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        text = Qwen2VLTextConfig(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [16, 24, 24]})
        config = Qwen2VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **ids)
    elif generation == "qwen2_5_vl":
        vision = Qwen2_5_VLVisionConfig(depth=32, hidden_size=vision_width, intermediate_size=2 * vision_width,
                                        num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                                        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        text = Qwen2_5_VLTextConfig(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "mrope_section": [16, 24, 24]})
        config = Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **ids)
    elif generation == "qwen3_vl":
        vision = Qwen3VLVisionConfig(depth=27, hidden_size=vision_width, intermediate_size=2 * vision_width,
                                     num_heads=2, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                                     temporal_patch_size=2, num_position_embeddings=2304,
                                     deepstack_visual_indexes=[8, 16, 24])
        text = Qwen3VLTextConfig(**text, head_dim=128, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        config = Qwen3VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **ids)
    else:
        raise ValueError(f"unknown Qwen-VL generation {generation!r}; one of {', '.join(QWEN_GENERATIONS)}")
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def tiny_qwen_vl(generation: str, seed: int = 0, **config_options):
    """A ``*ForConditionalGeneration`` of ``generation`` with random weights, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_qwen_config(generation, **config_options)
    name = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration"}[generation]
    model = getattr(transformers, name)(config)
    return _sharpened(model, ("q_proj.weight", "k_proj.weight", "attn.qkv.weight"))


def qwen_image_processor(generation: str):
    """The image processor of ``generation`` (PIL backend, no download), images between 2x2 and
    32x32 merge groups."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = qwen_patch_size(generation)
    unit = 2 * patch
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    min_pixels=(2 * unit) ** 2, max_pixels=(32 * unit) ** 2)


def qwen_prompt(text_before: list[int], items: list[tuple[str, int]], text_after: list[int]) -> tuple[list, list]:
    """``(input_ids, mm_token_type_ids)`` of one prompt: text, each visual item as
    ``<vision_start>`` + its placeholders + ``<vision_end>``, text. ``items``: ``("image" or
    "video", number of LLM tokens)``, or ``("text", token id)`` for a text token between them (the
    timestamp Qwen3-VL writes before each video frame)."""
    ids, types = [QWEN_TOKENS["bos"], *text_before], [0] * (1 + len(text_before))
    for kind, tokens in items:
        if kind == "text":
            ids, types = ids + [tokens], types + [0]
            continue
        ids += [QWEN_TOKENS["vision_start"], *[QWEN_TOKENS[kind]] * tokens, QWEN_TOKENS["vision_end"]]
        types += [0, *[1 if kind == "image" else 2] * tokens, 0]
    return ids + list(text_after), types + [0] * len(text_after)


# -- the Video-LLaVA family -------------------------------------------------------------------------

#: token ids of the tiny Video-LLaVA (a 96-word vocabulary, the two placeholders last)
VIDEO_LLAVA_TOKENS = {"pad": 0, "bos": 1, "eos": 2, "image": 94, "video": 95}
#: frames per video, as Video-LLaVA samples them
VIDEO_LLAVA_FRAMES = 8


def tiny_video_llava_config(*, vision_layers: int = 24, llm_layers: int = 8, attn_implementation: str = "sdpa"):
    """A :class:`transformers.VideoLlavaConfig` with Video-LLaVA's real geometry at tiny widths:
    two CLIP-224/14 towers (256 patches + [CLS]) of 24 layers, features from layer -2, images
    handing on their patches and frames their [CLS] and patches (2,056 tokens for 8 frames)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=224, patch_size=14, projection_dim=32)
    tokens = VIDEO_LLAVA_TOKENS
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=4096,
                       pad_token_id=tokens["pad"], bos_token_id=tokens["bos"], eos_token_id=tokens["eos"])
    config = VideoLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                              image_token_index=tokens["image"], video_token_index=tokens["video"],
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              image_seq_length=256, video_seq_length=257 * VIDEO_LLAVA_FRAMES)
    config._attn_implementation = attn_implementation
    return config


def tiny_video_llava(seed: int = 0, **config_options):
    """A :class:`transformers.VideoLlavaForConditionalGeneration` with random weights, in eval mode."""
    from transformers import VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(**config_options))
    return _sharpened(model)

