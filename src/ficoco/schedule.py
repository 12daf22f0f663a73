"""Per-layer schedules: how many tokens each layer removes.

A schedule is a plain ``{layer_index: tokens_removed}`` dict. A reduction "in layer l" happens after
that layer's self-attention, so the layers after ``l`` see the shorter sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def spread_evenly(total: int, layers: Sequence[int]) -> dict[int, int]:
    """Split ``total`` removals over ``layers`` as evenly as possible; earlier layers take the
    remainder (384 over 11 layers → seven layers of 35, then four of 34)."""
    if total < 0:
        raise ValueError(f"cannot remove a negative number of tokens ({total})")
    layers = list(layers)
    if total and not layers:
        raise ValueError("no layers to spread the removals over")
    base, extra = divmod(total, len(layers)) if layers else (0, 0)
    return {layer: base + (i < extra) for i, layer in enumerate(layers) if base + (i < extra) > 0}


def spread_geometrically(available: int, keep: int, layers: Sequence[int]) -> dict[int, int]:
    """Removals over ``layers`` such that each keeps the same share ``(keep / available) ** (1 /
    len(layers))`` of its input (PyramidDrop's pyramid: 576 -> 288 -> 144 -> 72 at a share of 0.5),
    the last landing exactly on ``keep``. Counts after stage ``s`` are ``round(available *
    share ** s)``."""
    if not 0 < keep <= available:
        raise ValueError(f"cannot keep {keep} of {available} tokens")
    layers = sorted(layers)
    share = (keep / available) ** (1 / len(layers))
    counts = [available] + [max(keep, round(available * share ** s)) for s in range(1, len(layers))] + [keep]
    return {layer: counts[i] - counts[i + 1] for i, layer in enumerate(layers) if counts[i] > counts[i + 1]}


def tokens_entering_layers(schedule: Mapping[int, int], num_layers: int, start_tokens: int) -> list[int]:
    """Number of tokens each of ``num_layers`` layers processes, given ``start_tokens`` at the input
    and the removals of ``schedule`` (a layer that reduces still runs on its input length)."""
    counts, current = [], start_tokens
    for layer in range(num_layers):
        counts.append(current)
        current -= schedule.get(layer, 0)
    return counts


def validate_schedule(schedule: Mapping[int, int], valid_layers: range, available: int, where: str) -> dict[int, int]:
    """Check an explicit schedule: integer layers inside ``valid_layers``, non-negative counts and
    at least one token left of ``available``. Returns a clean copy without zero entries."""
    clean = {}
    for layer, count in schedule.items():
        if not isinstance(layer, int) or layer not in valid_layers:
            raise ValueError(
                f"schedule layer {layer!r} is outside the {where} layers that can reduce "
                f"({valid_layers.start}..{valid_layers.stop - 1})"
            )
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"schedule count for layer {layer} must be a non-negative integer, got {count!r}")
        if count:
            clean[layer] = count
    if sum(clean.values()) >= available:
        raise ValueError(
            f"schedule removes {sum(clean.values())} tokens but only {available} {where} tokens are available"
        )
    return dict(sorted(clean.items()))
