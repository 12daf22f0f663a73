"""The equivalence matrix of the LLaVA-NeXT-layout families with videos (LLaVA-OneVision,
LLaVA-NeXT-Video), one method on one batch per call, so that each forward serves several checks:
exact counts (the caller's ``counts``), batched == one by one with padding on both sides,
generate() == manual prefill + cached decoding, detach restores the model, eager == SDPA."""

from __future__ import annotations

from collections.abc import Callable

import torch

import ficoco
from tests.test_llava_next import _valid_rows, hook_count, logits
from tests.test_models import _cache_argument, _cache_of

EOS = 2


def kept(handle, ids, tokens) -> list[int]:
    """Per row, the real tokens among the last prefill's survivors whose prompt id is in ``tokens``."""
    survivors = ids.gather(1, handle.kept_index)
    hit = torch.isin(survivors, torch.tensor(tokens))
    return (hit & handle.kept_valid).sum(1).tolist()


def greedy(model, handle, inputs, steps: int):
    """Prefill (its logits and real output positions) then ``steps`` cached decoding steps as
    ``generate(min_new_tokens=steps)`` takes them: the end of sequence is never picked."""
    prepared = handle.prepare_inputs(**inputs)
    mask = prepared["attention_mask"]
    position = mask.long().cumsum(-1) - 1
    out = model(**prepared, use_cache=True, position_ids=position.clamp_min(0))
    prefill, valid = out.logits, handle.kept_valid
    valid = None if valid is None else valid.clone()
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1].clone().index_fill_(-1, torch.tensor([EOS]), float("-inf")).argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        position = position[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, use_cache=True, position_ids=position,
                    **{_cache_argument(model): _cache_of(out)})
    return prefill, valid, torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


def output_mask(handle, inputs):
    """``[B, L']`` which output positions are real tokens."""
    if handle.kept_index is not None:
        return inputs["attention_mask"].gather(1, handle.kept_index).bool() & handle.kept_valid
    return handle.prepare_inputs(**inputs)["attention_mask"].bool()


def matrix(model, eager_model, samples: list[dict], vanilla, method: ficoco.Method, counts: Callable, *,
           family: str, batch: Callable) -> None:
    """``method`` on ``samples`` batched by ``batch(samples, side)``; ``vanilla``: the model's own
    logits of the batch padded right and of its first sample alone; ``counts(handle, inputs,
    prepared, logits)`` checks the kept tokens."""
    right, left = batch(samples, "right"), batch(samples, "left")
    before, steps = hook_count(model), 3
    handle = ficoco.attach(model, method)
    try:
        assert handle.family == family and hook_count(model) > before
        with torch.inference_mode():
            batched, valid = {"right": model(**right).logits}, {}
            counts(handle, right, handle.prepare_inputs(**right), batched["right"])
            real = output_mask(handle, right)
            valid["right"] = None if handle.kept_valid is None else handle.kept_valid.clone()
            singles = [model(**batch([sample])).logits[0] for sample in samples]
            gen = model.generate(**left, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            # the manual decoding's prefill is the batch padded left
            batched["left"], valid["left"], tokens, step_logits = greedy(model, handle, left, steps)
    finally:
        handle.remove()
    for side, out in batched.items():
        for row, single in enumerate(singles):
            # real tokens: neither padding nor (decoder side) the dead rows that keep the batch rectangular
            got = out[row][valid[side][row]] if valid[side] is not None else \
                _valid_rows(out[row], single.shape[0], side)
            torch.testing.assert_close(got, single, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, : left["input_ids"].shape[1]], left["input_ids"])
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, -steps:], tokens)
    # detached: no hook, no instance wrapper, the vanilla logits exactly
    assert batched["right"].shape[1] < vanilla[0].shape[1]
    assert hook_count(model) == before and "generate" not in model.__dict__
    assert not {"get_image_features", "pack_image_features", "get_video_features"} & set(model.model.__dict__)
    torch.testing.assert_close(logits(model, batch(samples[:1])), vanilla[1], rtol=0, atol=0)
    with ficoco.apply(eager_model, method):
        eager = logits(eager_model, right)
    torch.testing.assert_close(batched["right"][real], eager[real], rtol=1e-4, atol=1e-4)
