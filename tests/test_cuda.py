"""The same guarantees on a GPU (skipped without CUDA): batched ≡ one-by-one, generate ≡ manual
decoding, exact counts, and bf16 runs, with CUDA's SDPA kernels and no host syncs per layer."""

from __future__ import annotations

import copy

import pytest
import torch

import ficoco

from .conftest import batch_inputs
from .test_models import RUNNABLE, _manual_greedy, build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model(model):
    return copy.deepcopy(model).cuda()


def _to(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("key", RUNNABLE)
def test_cuda_batched_equals_one_by_one(cuda_model, images, prompts, key):
    with ficoco.apply(cuda_model, build(key)), torch.inference_mode():
        batched = cuda_model(**_to(batch_inputs(prompts, images), "cuda")).logits
        for row, prompt in enumerate(prompts):
            single = cuda_model(**_to(batch_inputs([prompt], images[row:row + 1]), "cuda")).logits[0]
            torch.testing.assert_close(batched[row, -single.shape[0]:], single, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("key", RUNNABLE)
def test_cuda_generate_equals_manual(cuda_model, images, prompts, key):
    inputs = _to(batch_inputs(prompts, images), "cuda")
    with ficoco.apply(cuda_model, build(key)) as handle, torch.inference_mode():
        gen = cuda_model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        tokens, _ = _manual_greedy(cuda_model, handle.prepare_inputs(**inputs), 4)
    assert torch.equal(gen[:, -4:], tokens)


@pytest.mark.parametrize("key", RUNNABLE)
def test_cuda_bfloat16_runs_with_exact_budget(cuda_model, images, prompts, key):
    model = copy.deepcopy(cuda_model).to(torch.bfloat16)
    inputs = _to(batch_inputs(prompts, images), "cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with ficoco.apply(model, build(key)) as handle, torch.inference_mode():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.isfinite(out).all()
    removed = 576 - handle.plan.llm_final_visual
    assert out.shape[1] == inputs["input_ids"].shape[1] - removed
    assert gen.shape == (3, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("key", ["vanilla", "ficoco-v", "tome", "evit", "ficoco-vl"])
def test_graphed_vision_tower_matches_eager(cuda_model, images, prompts, key):
    inputs = _to(batch_inputs(prompts, images), "cuda")
    handle = ficoco.attach(cuda_model, build(key)) if key != "vanilla" else None
    try:
        with torch.inference_mode():
            eager = cuda_model(**inputs).logits
            with ficoco.graph_vision_tower(cuda_model) as graphed:
                first = cuda_model(**inputs).logits
                again = cuda_model(**inputs).logits  # a replay
                assert len(graphed.captured) == 1
            assert "forward" not in cuda_model.model.vision_tower.__dict__
    finally:
        if handle:
            handle.remove()
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["ficoco-l", "ficoco-l-k2", "fastv", "ficoco-vl"])
def test_graphed_language_steps_match_eager(cuda_model, images, prompts, key):
    inputs = _to(batch_inputs(prompts, images), "cuda")
    single = _to(batch_inputs(prompts[:1], images[:1]), "cuda")
    with ficoco.apply(cuda_model, build(key)) as handle, torch.inference_mode():
        eager = cuda_model(**inputs).logits
        eager_kept = handle.kept_index.clone()
        eager_single = cuda_model(**single).logits
        with ficoco.graph_language_steps(handle) as graphed:
            first = cuda_model(**inputs).logits
            again = cuda_model(**inputs).logits  # a replay
            assert len(graphed.captured) == len(handle.plan.language)  # one graph per reducing layer
            assert torch.equal(handle.kept_index, eager_kept)
            # a second batch shape: new graphs reading the same shared input buffers
            graphed_single = cuda_model(**single).logits
            assert len(graphed.captured) == 2 * len(handle.plan.language)
            after = cuda_model(**inputs).logits
            gen = cuda_model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert handle.language.step_graphs is None
        eager_gen = cuda_model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for graphed_logits in (first, again, after):
        torch.testing.assert_close(graphed_logits, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed_single, eager_single, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, eager_gen)


@pytest.mark.parametrize("key", ["pool", "divprune", "cdpruner"])
def test_graphed_input_reduction_matches_eager(cuda_model, images, prompts, key):
    """The reduction of the projected tokens replayed as a CUDA graph keeps what the eager hook
    keeps (positions, sizes, logits); a second batch shape (and instruction length) captures a new
    graph; generate() runs through it; removing it restores the eager hook."""
    inputs = _to(batch_inputs(prompts, images), "cuda")
    single = _to(batch_inputs(prompts[:1], images[:1]), "cuda")
    with ficoco.apply(cuda_model, build(key)) as handle, torch.inference_mode():
        eager = cuda_model(**inputs).logits
        eager_positions, eager_sizes = handle.input.last.positions.clone(), handle.input.last.sizes.clone()
        eager_single = cuda_model(**single).logits
        eager_gen = cuda_model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with ficoco.graph_input_reduction(handle) as graphed:
            first = cuda_model(**inputs).logits
            again = cuda_model(**inputs).logits  # a replay
            assert len(graphed.captured) == 1
            assert torch.equal(handle.input.last.positions, eager_positions)
            assert torch.equal(handle.input.last.sizes, eager_sizes)
            graphed_single = cuda_model(**single).logits
            assert len(graphed.captured) == 2
            gen = cuda_model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert handle.input.step_graphs is None
    for graphed_logits in (first, again):
        torch.testing.assert_close(graphed_logits, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed_single, eager_single, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, eager_gen)


def _greedy_dpp_float64_check(kernel, relevance, floor, chosen, rtol=1e-4, atol=None):
    """Replays CDPruner's greedy MAP in float64 along ``chosen`` (one sample) and checks each pick
    is a best one up to float32 rounding: its gain within ``rtol`` of the largest (or, once the
    gains run out, its relevance within ``rtol`` of the largest). With ``atol`` the gains are
    compared within that absolute tolerance instead (where gains fall to the rounding error of
    the sums that made them)."""
    kernel, relevance = kernel.double(), relevance.double()
    n = kernel.shape[0]
    gain = kernel.diagonal().clone()
    factors = kernel.new_zeros(len(chosen), n)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    for step, pick in enumerate(chosen.tolist()):
        free = gain.masked_fill(taken, float("-inf"))
        tol = rtol * free.max().abs() if atol is None else atol
        band = floor * rtol if atol is None else atol
        if free.max() > floor + band:
            assert gain[pick] >= free.max() - tol, f"step {step}: a pick short of the best gain"
        elif free.max() < floor - band:
            best = relevance.masked_fill(taken, float("-inf")).max()
            assert relevance[pick] >= best - rtol * best.abs(), f"step {step}: an exhausted pick not by relevance"
        assert not taken[pick]
        taken[pick] = True
        e = (kernel[pick] - factors[:step, pick] @ factors[:step]) / gain[pick].clamp_min(floor).sqrt()
        factors[step] = e
        gain = gain - e.square()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_cosine_similarity_of_half_rows_is_the_float32_one(dtype):
    """DivPrune's and CDPruner's similarity of half-precision tokens on the GPU (one tensor-core
    product, float32 output) equals the float32 path's (rows upcast, normalised, multiplied) to
    float32 rounding."""
    import torch.nn.functional as F

    from ficoco.stages.diversity import cosine_similarity_matrix

    torch.manual_seed(0)
    x = (torch.randn(4, 576, 4096, device="cuda") * torch.rand(4, 576, 1, device="cuda") * 3).to(dtype)
    x[0, 5] = 0  # a zero row: zero similarity, as F.normalize gives it
    fast = cosine_similarity_matrix(x)
    y = F.normalize(x.float(), dim=-1)
    assert fast.dtype == torch.float32
    # two float32 sums of 4096 products in different orders (cuBLAS tiles either way): 2e-5 apart at
    # worst on the H200; a half-precision result would be ~4e-3 off
    torch.testing.assert_close(fast, y @ y.transpose(1, 2), rtol=0, atol=1e-4)


@pytest.mark.parametrize("b, n, kept", [(8, 576, 64), (8, 576, 192), (32, 576, 192), (8, 1196, 299), (8, 1196, 598),
                                        (2, 2880, 640)])
def test_cuda_greedy_kernels_equal_the_pytorch_loops(b, n, kept):
    """DivPrune's and CDPruner's Triton kernels (stages/greedy_kernels.py) at the models' sizes:
    DivPrune keeps exactly the PyTorch loop's tokens (min and argmax are exact); CDPruner's picks
    are each a best one up to float32 rounding (sums in another order can flip a near-tie)."""
    pytest.importorskip("triton")
    from ficoco.stages import FeatureProbe
    from ficoco.stages.diversity import ConditionalDPPFilter, MaxMinDiversityFilter
    from ficoco.stages.tokens import TokenGroup

    torch.manual_seed(n + kept)
    x = torch.randn(b, n, 1024, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(b, 12, 1024, device="cuda", dtype=torch.bfloat16)
    tokens = TokenGroup.fresh(x, (1, n))
    probe = FeatureProbe(lambda: (text, torch.ones(b, 12, dtype=torch.bool, device="cuda")))
    slow = MaxMinDiversityFilter(backend="torch").select(tokens, probe, kept)
    fast = MaxMinDiversityFilter(backend="triton").select(tokens, probe, kept)
    assert torch.equal(fast, slow)
    stage = ConditionalDPPFilter(backend="triton")
    fast = stage.select(tokens, probe, kept)
    slow = ConditionalDPPFilter(backend="torch").select(tokens, probe, kept)
    agree = (fast == slow).float().mean().item()
    kernel, r, floor = stage.dpp_inputs(tokens, probe)
    for row in range(b):
        assert fast[row].unique().numel() == kept
        _greedy_dpp_float64_check(kernel[row], r[row], floor[row].item(), fast[row])
    assert agree > 0.5, f"the two backends agree on only {agree:.0%} of the picks"


@pytest.mark.parametrize("parts", [1, 3, 16, None])
def test_cuda_dpp_kernel_with_shared_columns_makes_best_picks(parts):
    """CDPruner's DPP kernel with each sample's columns shared by ``parts`` programs that wait for
    each other at every step (None: as many as stay resident): every pick a best one in a float64
    replay, through the point where the gains run out (feature width 96 < 300 kept) and relevance
    order takes over."""
    pytest.importorskip("triton")
    from ficoco.stages.greedy_kernels import greedy_dpp

    torch.manual_seed(parts or 0)
    b, n, kept = 4, 700, 300
    x = torch.nn.functional.normalize(torch.randn(b, n, 96, device="cuda"), dim=-1)
    x[:, 1::7] = x[:, 0:1]  # exact duplicates: gains of exactly zero, ties
    r = torch.rand(b, n, device="cuda") + 0.5
    kernel = r[:, :, None] * (x @ x.transpose(1, 2)) * r[:, None, :]
    scale = kernel.diagonal(dim1=1, dim2=2).amax(dim=1)
    floor = 1e-3 * scale  # well above the float32 error of the gains once they run out
    chosen = greedy_dpp(kernel, r, floor, kept, parts=parts)
    for row in range(b):
        assert chosen[row].unique().numel() == kept
        _greedy_dpp_float64_check(kernel[row], r[row], floor[row].item(), chosen[row], atol=5e-5 * scale[row].item())
