"""Sparse weight patterns: magnitude pruning to N:M, blocks and unstructured density, and bad specs."""
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecc
from sparsecc.sparsity import NM, Blocks, Sparsity, Unstructured, sparsify
from models import make


@settings(max_examples=40, deadline=None)
@given(nm=st.sampled_from([(1, 4), (2, 4), (2, 8), (4, 8)]), rows=st.integers(1, 9), groups=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_nm_keeps_the_n_largest_of_every_group(nm, rows, groups, seed):
    n, m = nm
    w = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = NM(n, m).mask(w)
    g_w, g_mask = w.abs().reshape(rows, groups, m), mask.reshape(rows, groups, m)
    assert (g_mask.sum(-1) == n).all()
    kept_min = torch.where(g_mask, g_w, torch.inf).amin(-1)
    dropped_max = torch.where(g_mask, -torch.inf, g_w).amax(-1)
    assert (kept_min >= dropped_max).all()


@settings(max_examples=30, deadline=None)
@given(size=st.sampled_from([8, 16, 32, 64]), br=st.integers(1, 4), bc=st.integers(1, 4),
       density=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_blocks_keep_the_densest_blocks_whole(size, br, bc, density, seed):
    w = torch.randn(br * size, bc * size, generator=torch.Generator().manual_seed(seed))
    mask = Blocks(size, density).mask(w)
    blocks = mask.reshape(br, size, bc, size).permute(0, 2, 1, 3).reshape(br * bc, -1)
    assert ((blocks.all(1)) | (~blocks.any(1))).all()            # every block is all kept or all dropped
    kept = blocks.all(1)
    assert kept.sum().item() == max(1, math.ceil(density * br * bc - 1e-9))
    norms = w.reshape(br, size, bc, size).square().sum((1, 3)).flatten()
    if (~kept).any():
        assert norms[kept].min() >= norms[~kept].max()


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 20), st.integers(1, 20)), density=st.floats(0.01, 1.0), seed=st.integers(0, 999))
def test_unstructured_keeps_the_largest_entries(shape, density, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = Unstructured(density).mask(w)
    assert mask.sum().item() == max(1, math.ceil(density * w.numel() - 1e-9))
    if (~mask).any():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_sparsify_prunes_in_place_and_records_masks():
    model, _ = make("transformer")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = Sparsity({"blocks.*.mlp.*.weight": NM(2, 4), "blocks.*.attn.q.weight": Blocks(8, density=0.25),
                     "blocks.0.attn.k.weight": Unstructured(density=0.2)})
    masks = sparsify(model, spec)
    assert set(masks) == {f"blocks.{i}.mlp.fc{j}.weight" for i in range(3) for j in (1, 2)} | \
        {f"blocks.{i}.attn.q.weight" for i in range(3)} | {"blocks.0.attn.k.weight"}
    params = dict(model.named_parameters())
    for name, p in params.items():
        expected = before[name] * masks[name] if name in masks else before[name]
        assert torch.equal(p.detach(), expected), name
    assert masks["blocks.0.mlp.fc1.weight"].float().mean().item() == 0.5
    assert masks["blocks.1.attn.q.weight"].float().mean().item() == 0.25
    assert model.sparsecc_masks.keys() == masks.keys()                    # recorded on the model: the same masks
    assert all(torch.equal(model.sparsecc_masks[n], m) for n, m in masks.items())
    assert model.sparsecc_patterns == {**{f"blocks.{i}.mlp.fc{j}.weight": NM(2, 4) for i in range(3) for j in (1, 2)},
                                       **{f"blocks.{i}.attn.q.weight": Blocks(8, density=0.25) for i in range(3)},
                                       "blocks.0.attn.k.weight": Unstructured(0.2)}


def test_sparsify_prunes_conv_weights_over_folded_kernel_dims():
    model, _ = make("convnet")
    masks = sparsify(model, Sparsity({"stem.weight": NM(1, 3), "pw.weight": Blocks(8, density=0.5)}))
    assert masks["stem.weight"].reshape(8, -1, 3).sum(-1).eq(1).all()
    assert masks["pw.weight"].float().mean().item() == 0.5


@pytest.mark.parametrize("spec,match", [
    (lambda: Sparsity({"fc1.weight": NM(2, 5)}), r"'fc1.weight'.*NM\(2, 5\).*12 input entries"),
    (lambda: Sparsity({"fc2.weight": Blocks(5, density=0.5)}), r"'fc2.weight'.*Blocks\(5\) does not divide.*32x32"),
    (lambda: Sparsity({"fc1.bias": Unstructured(0.5)}), r"'fc1.bias'.*not a weight"),
    (lambda: Sparsity({"fc9.weight": NM(2, 4)}), r"'fc9.weight' matches no parameter.*Did you mean"),
    (lambda: NM(4, 4), "N must be smaller than M"),
    (lambda: NM(5, 4), "N must be smaller than M"),
    (lambda: Blocks(16, density=0.0), r"density must be in \(0, 1\]"),
    (lambda: Unstructured(density=1.5), r"density must be in \(0, 1\]"),
    (lambda: Sparsity({"fc1.weight": "2:4"}), "must be sparsecc.NM, Blocks or Unstructured"),
])
def test_bad_specs_name_the_key_and_change_nothing(spec, match):
    model, _ = make("mlp")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsecc.ConfigError, match=match):
        sparsify(model, spec())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "sparsecc_masks")


# ---- transposable N:M (2:4 along rows and columns of every 4x4 tile) ----------------------------------------------

@functools.lru_cache(maxsize=None)
def brute_force_tile_masks(n, m):
    """Every m x m 0/1 matrix with n ones per row and per column, found by trying all 2**(m*m) of them."""
    every = ((torch.arange(1 << (m * m))[:, None] >> torch.arange(m * m)) & 1).bool().view(-1, m, m)
    return every[((every.sum(1) == n).all(1)) & ((every.sum(2) == n).all(1))]


def test_tile_masks_are_all_the_valid_tiles():
    from sparsecc.sparsity import tile_masks
    for n, m in ((2, 4), (1, 4), (3, 4), (1, 2)):
        ours = {tuple(t.flatten().tolist()) for t in tile_masks(n, m)}
        assert ours == {tuple(t.flatten().tolist()) for t in brute_force_tile_masks(n, m)}
    assert len(tile_masks(2, 4)) == 90


@settings(max_examples=30, deadline=None)
@given(tiles_r=st.integers(1, 6), tiles_c=st.integers(1, 6), seed=st.integers(0, 10_000),
       nm=st.sampled_from([(2, 4), (1, 4), (3, 4)]))
def test_transposable_mask_is_nm_both_ways_and_magnitude_optimal_per_tile(tiles_r, tiles_c, seed, nm):
    n, m = nm
    w = torch.randn(tiles_r * m, tiles_c * m, generator=torch.Generator().manual_seed(seed))
    mask = NM(n, m, transposable=True).mask(w)
    assert (mask.reshape(w.shape[0], -1, m).sum(-1) == n).all()                # rows: N:M
    assert (mask.t().reshape(w.shape[1], -1, m).sum(-1) == n).all()            # columns: the transpose is N:M
    candidates = brute_force_tile_masks(n, m).to(w.dtype)                      # [K, m, m]
    for i in range(tiles_r):
        for j in range(tiles_c):
            tile = w[i * m:(i + 1) * m, j * m:(j + 1) * m].abs()
            kept = (tile * mask[i * m:(i + 1) * m, j * m:(j + 1) * m]).sum()
            best = (candidates * tile).sum((1, 2)).max()
            assert kept >= best - 1e-6 * best.abs()


def test_transposable_nm_validation_and_repr():
    assert repr(NM(2, 4)) == "NM(n=2, m=4)" and NM(2, 4) == NM(2, 4, transposable=False)
    assert repr(NM(2, 4, transposable=True)) == "NM(n=2, m=4, transposable=True)"
    with pytest.raises(sparsecc.ConfigError, match="M <= 4"):
        NM(2, 8, transposable=True)
    with pytest.raises(sparsecc.ConfigError, match="transposable must be True or False"):
        NM(2, 4, transposable=1)
    model = torch.nn.Linear(8, 6)                                              # 6 rows: no 4 x 4 tiling
    with pytest.raises(sparsecc.ConfigError, match="does not divide its 6 rows"):
        sparsify(model, Sparsity({"weight": NM(2, 4, transposable=True)}))
    model = torch.nn.Linear(8, 12)
    masks = sparsify(model, Sparsity({"weight": NM(2, 4, transposable=True)}))
    assert (masks["weight"].t().reshape(8, -1, 4).sum(-1) == 2).all()
