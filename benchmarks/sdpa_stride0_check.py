"""Is a batched-vs-one-by-one mismatch ficoco's, or PyTorch's? A check without ficoco.

On the H200 (torch 2.11), SparseVLM on the tiny Qwen-VL models gave batched rows that differed from
the same samples run alone, with SDPA only. The calls captured there pointed at torch's
memory-efficient attention kernel: with one key/value head, transformers' ``repeat_kv`` hands SDPA
keys and values whose head axis has stride 0, and that kernel returns wrong rows for such inputs
when the key length is 1 mod 32 under a mask (pytorch/pytorch#191937, fixed by PR #191984).

This script runs the *vanilla* tiny Qwen2-VL LLM (no ficoco attached) on a padded text batch whose
padded length is 65 (1 mod 32) or 66, with one or two key/value heads, and prints the largest
difference between each batched row and the same sample alone. On an affected torch, only
"1 kv head, length 65" differs on CUDA; everywhere else every row agrees to float32 rounding.

    python benchmarks/sdpa_stride0_check.py        # CUDA if present, else the CPU
"""

from __future__ import annotations

import torch

from ficoco.testing import QWEN_TOKENS, tiny_qwen_vl


def largest_row_difference(model, length: int, device: str) -> float:
    """Max |batched - alone| over the real tokens of a batch of [``length``, ``length`` - 25] tokens
    (left padding)."""
    generator = torch.Generator().manual_seed(length)
    lengths = [length, length - 25]
    rows = [torch.randint(10, 140, (n,), generator=generator) for n in lengths]
    ids = torch.full((2, length), QWEN_TOKENS["pad"])
    mask = torch.zeros(2, length, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, length - row.numel():], mask[r, length - row.numel():] = row, 1
    with torch.inference_mode():
        batched = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        worst = 0.0
        for r, row in enumerate(rows):
            alone = model(input_ids=row[None].to(device)).logits[0]
            worst = max(worst, (batched[r, length - row.numel():] - alone).abs().max().item())
    return worst


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    for heads in ((2, 1), (4, 2)):
        model = tiny_qwen_vl("qwen2_vl", llm_heads=heads).to(device)
        for length in (65, 66, 97):
            diff = largest_row_difference(model, length, device)
            print(f"{heads[1]} kv head(s) for {heads[0]} query heads, padded length {length}: "
                  f"batched vs alone max |diff| = {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
