"""Seconds per training step of the Qwen proxy on one GPU (batch 128, 12 turns), with and without
a token-drop step, through the padded and the native one-call tower attention, and a profile of
one step. Run from the repository root: ``PYTHONPATH=src python benchmarks/profile_qwen_proxy_step.py``.
Its output on an H200 (2026-12-03) is docs/proxy/qwen/attempt0-step-profile.log: 0.32 s per plain
step, 2.7 s per token-drop step (a device-to-host copy per text run while rebuilding positions, since
fixed in adapters/qwen_vl.py)."""

import time, torch, contextlib
from ficoco.proxy import qwen
from ficoco.proxy.train import collate
from ficoco.checkpoint import load_model, load_processor
from ficoco.adapters import attach
from ficoco.adapters.varlen import fast_vision_attention
from ficoco.methods.baselines import random_drop
from torch.profiler import profile, ProfilerActivity
llava, lp = load_model("src/ficoco/assets/proxy-llava"), load_processor("src/ficoco/assets/proxy-llava")
m, p = qwen.build(qwen.language_words(lp))
with torch.no_grad(): qwen.transfer_language_model(m, p.tokenizer, llava, lp.tokenizer)
m.cuda().train()
s = qwen.training_stream(12)
enc = qwen.fast_encoder(p)
t = time.time(); batch = collate([s(i) for i in range(128)], p, encode=enc); print("collate 128 on one core", time.time() - t)
batch = {k: v.cuda() for k, v in batch.items()}
batch["pixel_values"] = qwen.normalize_patches(batch["pixel_values"], p)
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
def step(drop):
    with attach(m, random_drop(0.5, seed=1)) if drop else contextlib.nullcontext():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(**batch).loss
    opt.zero_grad(); loss.backward(); opt.step()
for kernel in ("padded", "auto"):
  with fast_vision_attention(m, kernel=kernel):
    for drop in (False, True):
        try:
            for _ in range(2): step(drop)
            torch.cuda.synchronize(); t = time.time()
            for _ in range(3): step(drop)
            torch.cuda.synchronize(); print(f"kernel {kernel} drop {drop}: {(time.time() - t) / 3:.3f} s/step", flush=True)
        except Exception as e: print(kernel, drop, "failed", repr(e)[:300])
with fast_vision_attention(m, kernel="padded"):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(False); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
