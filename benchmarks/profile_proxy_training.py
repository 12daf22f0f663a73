"""Where a proxy-model training step spends its time on a GPU: the data pipeline alone, and
forward + backward + AdamW on a fixed batch at several batch sizes, eager and with the vision
tower compiled. Prints one line per measurement.

    python benchmarks/profile_proxy_training.py
"""

from __future__ import annotations

import time

import torch

from ficoco.proxy.recipe import build, mixed_training_stream
from ficoco.proxy.train import collate


def time_steps(model, batch, steps=8, compile_vision=False):
    device = torch.device("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in batch.items()}
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main():
    model, processor = build()
    model.cuda().train()
    print("attention:", model.config._attn_implementation, model.config.vision_config._attn_implementation, flush=True)
    sample_at = mixed_training_stream([], 0, 0)
    samples = [sample_at(i) for i in range(256)]
    for size in (64, 128, 256):
        batch = collate(samples[:size], processor)
        print(f"eager batch {size}: {time_steps(model, batch) * 1e3:.1f} ms/step", flush=True)
    started = time.perf_counter()
    model.model.vision_tower.compile()
    batch = collate(samples[:128], processor)
    time_steps(model, batch, steps=1)
    print(f"compile vision tower: first steps {time.perf_counter() - started:.1f} s", flush=True)
    for size in (64, 128, 256):
        batch = collate(samples[:size], processor)
        print(f"vision-compiled batch {size}: {time_steps(model, batch) * 1e3:.1f} ms/step", flush=True)
    from torch.utils.data import DataLoader
    loader = DataLoader(range(64 * 60), batch_size=64, num_workers=14, collate_fn=lambda idx: collate(
        [sample_at(i) for i in idx], processor))
    started = None
    for i, _ in enumerate(loader):
        if i == 10:
            started = time.perf_counter()
    print(f"data only, 14 workers, batch 64: {(time.perf_counter() - started) / 49 * 1e3:.1f} ms/batch", flush=True)


if __name__ == "__main__":
    main()
