"""The Triton greedy kernels (stages/greedy_kernels.py) against the PyTorch loops of DivPrune and
CDPruner, in Triton's interpreter on the CPU (a subprocess: ``TRITON_INTERPRET`` must be set
before Triton is imported). tests/test_cuda.py repeats this on a GPU at the models' sizes."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from ficoco.stages.diversity import ConditionalDPPFilter, MaxMinDiversityFilter

from .triton_interpreter import run_interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

CHECK = textwrap.dedent('''
    import json, sys
    import torch
    from ficoco.stages import FeatureProbe
    from ficoco.stages.diversity import ConditionalDPPFilter, MaxMinDiversityFilter
    from ficoco.stages.greedy_kernels import greedy_dpp
    from ficoco.stages.tokens import TokenGroup

    out = []
    for seed, (b, n, d, kept, duplicates, theta) in enumerate(json.loads(sys.argv[1])):
        torch.manual_seed(seed)
        x = torch.randn(b, n, d)
        if duplicates:  # exact copies: ties that the lowest index must win in both backends
            x[:, 1::3] = x[:, 0:1]
        tokens = TokenGroup.fresh(x, (1, n))
        text, valid = torch.randn(b, 5, d), torch.ones(b, 5, dtype=torch.bool)
        valid[-1, 3:] = False  # a shorter instruction in the last sample
        probe = FeatureProbe(lambda: (text, valid))
        row = {}
        for name, make in (("divprune", lambda bk: MaxMinDiversityFilter(backend=bk)),
                           ("cdpruner", lambda bk: ConditionalDPPFilter(theta=theta, backend=bk))):
            slow = make("torch").select(tokens, probe, kept)
            fast = make("triton").select(tokens, probe, kept)
            row[name] = [slow.tolist(), fast.tolist()]
        # the columns shared by several programs, one launch per step (the interpreter runs a
        # launch's programs one after another, so the one-launch form would wait forever)
        kernel, r, floor = ConditionalDPPFilter(theta=theta).dpp_inputs(tokens, probe)
        for parts in (2, 3):
            row[f"cdpruner, {parts} parts"] = [row["cdpruner"][0], greedy_dpp(kernel, r, floor, kept, parts=parts,
                                                                              stepwise=True).tolist()]
        out.append(row)
    print(json.dumps(out))
''')

CASES = [
    (3, 37, 16, 10, False, None),  # N not a power of two, several samples
    (2, 50, 4, 20, False, 0.5),  # rank 4 < kept: CDPruner's gains run out, relevance order takes over
    (1, 20, 8, 20, False, None),  # every token kept
    (2, 31, 8, 12, True, None),  # duplicates
    (2, 9, 6, 1, False, None),  # one token
]


@needs_triton
def test_triton_kernels_keep_what_the_pytorch_loops_keep():
    rows = run_interpreted(CHECK, CASES)
    for case, row in zip(CASES, rows):
        for name, (slow, fast) in row.items():
            assert fast == slow, f"{name} {case}"
            assert all(len(set(sample)) == case[3] for sample in fast)  # distinct tokens, exactly kept


def test_auto_uses_pytorch_off_the_gpu_and_unknown_backends_are_refused():
    from ficoco.stages.diversity import _use_triton

    assert not _use_triton("auto", torch.device("cpu"), 576)
    assert not _use_triton("torch", torch.device("cpu"), 576)
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton', got 'cuda'"):
        MaxMinDiversityFilter(backend="cuda").select(_tokens(), None, 2)
    with pytest.raises(ValueError, match="backend must be"):
        _use_triton("fast", torch.device("cpu"), 4)
    assert ConditionalDPPFilter().backend == MaxMinDiversityFilter().backend == "auto"  # timed on a GPU


def _tokens():
    from ficoco.stages.tokens import TokenGroup

    return TokenGroup.fresh(torch.randn(1, 6, 4), (2, 3))


@needs_triton
def test_dpp_columns_are_shared_only_where_the_rows_are_large():
    """How many programs share a sample's DPP columns (each step's wait pays only for large rows;
    the grid must stay resident: at most processors // batch)."""
    from ficoco.stages.greedy_kernels import column_parts

    h200 = 132
    assert column_parts(8, 1196, 598, h200) == 16  # Qwen2.5-VL at 1/2: 132 // 8
    assert column_parts(1, 1196, 150, h200) == 19  # ceil(1196 / 64) columns of at least 64
    assert column_parts(8, 576, 192, h200) == 9
    assert column_parts(8, 576, 64, h200) == 1  # small rows: one program per sample
    assert column_parts(40, 576, 128, h200) == 1  # LLaVA-NeXT's crops: small rows
    assert column_parts(200, 1196, 598, h200) == 1  # more samples than processors
