"""Encoder and layer behaviour: shapes, masking, knobs, parameter counts."""

import math

import pytest
import torch

from trm_lightning.models.conditioning import ConditionerShape
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.models.layers import Attention, RotaryEmbedding, apply_rope, rms_norm, swiglu_intermediate
from trm_lightning.models.trm import TinyRecursiveModel

S, D = 6, 32


def _demos(B=3, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    di = torch.randint(2, 12, (B, K, S * S), generator=g, dtype=torch.int32)
    do = torch.randint(2, 12, (B, K, S * S), generator=g, dtype=torch.int32)
    di[..., -S:] = 0  # some PAD so the key mask matters
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)[:B]
    return di, do, mask


def _encoder(num_heads=4, output_tokens=4, **knobs):
    torch.manual_seed(0)
    shape = ConditionerShape(hidden_size=D, prefix_len=output_tokens, num_heads=num_heads, canvas_size=S)
    return StandardDemoEncoder(shape, **knobs)


def test_reference_parameter_counts():
    assert sum(p.numel() for p in TinyRecursiveModel().parameters()) == 6_829_058
    arc = ConditionerShape(hidden_size=512, prefix_len=16, num_heads=8, canvas_size=30)
    assert sum(p.numel() for p in StandardDemoEncoder(arc).parameters()) == 10_506_240
    assert swiglu_intermediate(512, 4) == 1536


def test_rms_norm_unit_rms_and_dtype():
    x = torch.randn(4, 7, 16, dtype=torch.bfloat16) * 5
    y = rms_norm(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float().pow(2).mean(-1), torch.ones(4, 7), atol=2e-2)


@pytest.mark.parametrize("pooling", ["mean", "attention", "weighted"])
def test_masked_demo_slots_do_not_change_output(pooling):
    enc = _encoder(pooling_method=pooling)
    di, do, mask = _demos()
    ref = enc.encode(di, do, mask)
    di2, do2 = di.clone(), do.clone()
    di2[~mask] = 7  # garbage in every masked slot
    do2[~mask] = 3
    assert torch.equal(enc.encode(di2, do2, mask), ref)
    assert ref.shape == (3, 4, D)
    assert torch.allclose(ref.pow(2).mean(-1), torch.ones(3, 4), atol=1e-4)  # unit RMS per token


def test_pad_keys_are_masked_in_grid_attention():
    attn = Attention(D, 4)
    x = torch.randn(2, 5, D)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, key_mask=keep)
    x2 = x.clone()
    x2[0, 3:] = 100.0  # masked keys/values must not matter for row 0
    assert torch.allclose(attn(x2, key_mask=keep)[0, :3], out[0, :3], atol=1e-6)


def test_row_without_demos_gives_finite_context():
    enc = _encoder()
    di, do, mask = _demos()
    mask[1] = False
    assert torch.isfinite(enc.encode(di, do, mask)).all()


@pytest.mark.parametrize(
    "knob,value",
    [
        ("num_layers", 3),
        ("output_tokens", 8),
        ("pooling_method", "attention"),
        ("pooling_method", "weighted"),
        ("set_layers", 2),
        ("layer_scale_init", 1e-4),
        ("norm_style", "pre"),
        ("pos_encoding", "rope2d"),
        ("absolute_positions", True),
    ],
)
def test_each_seed_knob_changes_the_encoder(knob, value):
    base = _encoder()
    changed = _encoder(**{knob: value})
    names_base = {n: p.shape for n, p in base.named_parameters()}
    names_new = {n: p.shape for n, p in changed.named_parameters()}
    di, do, mask = _demos()
    out_base, out_new = base.encode(di, do, mask), changed.encode(di, do, mask)
    # either the parameters differ in structure, or (same structure) the function differs
    assert names_base != names_new or not torch.allclose(out_base, out_new)
    if knob == "output_tokens":
        assert out_new.shape[1] == 8


def test_layer_scale_starts_small():
    enc = _encoder(layer_scale_init=1e-4, norm_style="pre")
    gammas = [p for n, p in enc.named_parameters() if n.endswith("gamma")]
    assert gammas and all(torch.allclose(g, torch.full_like(g, 1e-4)) for g in gammas)


def test_bad_knob_values_fail_clearly():
    with pytest.raises(ValueError, match="pooling"):
        _encoder(pooling_method="max")
    with pytest.raises(ValueError, match="norm_style"):
        _encoder(norm_style="sandwich")
    with pytest.raises(ValueError, match="divisible"):
        _encoder(num_heads=5)


def test_embedding_scale_gives_unit_rms_tokens():
    trm = TinyRecursiveModel(seq_len=S * S, hidden_size=64, num_heads=4, prefix_len=2)
    x = trm.embed(torch.randint(0, 12, (8, S * S)), torch.zeros(8, 2, 64))
    assert x.shape == (8, 2 + S * S, 64)
    rms = x[:, 2:].pow(2).mean().sqrt().item()
    assert 0.7 < rms < 1.3, rms
    assert math.isclose(trm.embed_scale, 8.0)


def _real_grids(n, seed=0):
    """Demo pairs of random sizes written as canvases (grid + EOS border + PAD), like the data pipeline."""
    import numpy as np

    from trm_lightning.data.tokenize import grid_to_canvas

    rng = np.random.default_rng(seed)
    ins, outs = [], []
    for _ in range(n):
        for side in (ins, outs):
            h, w = rng.integers(1, S + 1, size=2)
            side.append(torch.from_numpy(grid_to_canvas(rng.integers(0, 10, (h, w)), S).astype("int32")))
    return torch.stack(ins).view(n // 4, 4, S * S), torch.stack(outs).view(n // 4, 4, S * S)


def _assert_same_encoding(reference, other, di, do, mask):
    """Two encoders with the same weights give the same context (atol 2e-5) and the same gradients."""
    ref, out = reference.encode(di, do, mask), other.encode(di, do, mask)
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
    g_ref = torch.autograd.grad(ref.square().sum(), list(reference.parameters()), allow_unused=True)
    g_out = torch.autograd.grad(out.square().sum(), list(other.parameters()), allow_unused=True)
    for a, b in zip(g_ref, g_out):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("pooling", ["mean", "attention", "weighted"])
@pytest.mark.parametrize("norm_style", ["post", "pre"])
def test_cropped_encoding_equals_the_full_canvas(pooling, norm_style):
    di, do = _real_grids(12)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    full = _encoder(pooling_method=pooling, norm_style=norm_style, crop_buckets=0)
    cropped = _encoder(pooling_method=pooling, norm_style=norm_style, crop_buckets=3)
    assert torch.equal(torch.cat([p.flatten() for p in full.parameters()]),
                       torch.cat([p.flatten() for p in cropped.parameters()]))
    _assert_same_encoding(full, cropped, di, do, mask)


@pytest.mark.parametrize("pooling, norm_style, transform", [
    ("mean", "post", "concat"), ("attention", "pre", "concat"), ("weighted", "post", "concat"), ("mean", "pre", "diff"),
    ("mean", "post", "absolute"),
])
def test_packed_attention_equals_the_bucketed_encoding(pooling, norm_style, transform):
    """``attention="packed"`` (every pair's real cells in one row, no padding; the padded reference on the CPU)
    gives the buckets' output and gradients; the packed layout's own kernel is the reference's numbers."""
    di, do = _real_grids(12)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    knobs = dict(pooling_method=pooling, norm_style=norm_style, transform=transform)
    if transform == "absolute":
        knobs.update(transform="concat", absolute_positions=True)
        full = _encoder(crop_buckets=0, **knobs)
        _assert_same_encoding(full, _encoder(crop_buckets=3, **knobs), di, do, mask)
    _assert_same_encoding(_encoder(crop_buckets=3, **knobs), _encoder(attention="packed", **knobs), di, do, mask)


def test_packed_attention_keeps_sequences_apart():
    from trm_lightning.models.layers import PackedLayout, packed_attention

    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 5])
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    out = packed_attention(q, k, v, PackedLayout.self_attention(lengths, 5))
    start = 0
    for n in lengths.tolist():  # each sequence alone, by plain SDPA
        sl = slice(start, start + n)
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl])
        assert torch.allclose(out[:, :, sl], alone, atol=1e-6)
        start += n
    with pytest.raises(Exception, match="cross"):
        _encoder(attention="packed", transform="cross")


def test_diff_transform_reads_colour_in_to_colour_out_per_cell():
    enc = _encoder(transform="diff", crop_buckets=0)
    di, do = _real_grids(4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = enc.encode(di, do, mask)
    out.square().sum().backward()
    rows = enc.grid_encoder.diff_embed.weight.grad.abs().sum(1).nonzero().flatten()
    # the rows that got gradient are exactly the (in, out) token pairs of cells present in both grids
    both = (di != 0) & (do != 0)
    pairs = torch.unique((di.long() * 12 + do.long())[both])
    assert torch.equal(rows, pairs)
    # with the diff segment, recolouring one output cell changes the context; a concat encoder sees it too,
    # but only the diff encoder has a token for the change itself
    assert enc.grid_encoder.rope.cos.shape[0] == 3 * S * S


@pytest.mark.parametrize("transform", ["cross", "concat"])
def test_cross_transform_keeps_the_input_grid_blind_to_the_output(transform):
    enc = _encoder(transform=transform, crop_buckets=0)
    di, do = _real_grids(4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    seen = []
    hook = enc.grid_encoder.layers[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    do2 = do.clone()
    do2[do2 > 1] = 2 + (do2[do2 > 1] - 1) % 10  # recolour every output cell
    out1, out2 = enc.encode(di, do, mask), enc.encode(di, do2, mask)
    hook.remove()
    inputs_after_self_attention = [h[:, : S * S] for h in seen]
    blind = torch.allclose(*inputs_after_self_attention, atol=1e-6)
    assert blind == (transform == "cross")  # cross: grids attend within themselves; concat: across
    assert not torch.allclose(out1, out2)  # either way the context sees the output grid


def test_test_conditioning_makes_the_context_depend_on_the_query():
    di, do, mask = _demos()
    q1 = torch.randint(2, 12, (3, S * S), dtype=torch.int32)
    q2 = torch.randint(2, 12, (3, S * S), dtype=torch.int32)
    plain = _encoder()
    assert torch.equal(plain.encode(di, do, mask, q1), plain.encode(di, do, mask, q2))  # off: the query is ignored
    cond = _encoder(test_conditioning=True)
    a, b = cond.encode(di, do, mask, q1), cond.encode(di, do, mask, q2)
    assert not torch.allclose(a, b) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="needs the query inputs"):
        cond.encode(di, do, mask)


def _rope_score(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, i: int, j: int) -> float:
    """The rotated dot product of query vector ``q`` at position ``i`` and key vector ``k`` at position ``j``."""
    cos, sin = rope()
    rq = apply_rope(q.view(1, 1, 1, -1), cos[i : i + 1], sin[i : i + 1])
    rk = apply_rope(k.view(1, 1, 1, -1), cos[j : j + 1], sin[j : j + 1])
    return float((rq * rk).sum())


def test_rope2d_relates_cells_by_their_row_and_column_offset():
    """2-D RoPE: a query/key score depends on the (row, column) offset of the two cells only, wherever they lie,
    while 1-D RoPE scores the flattened offset (the end of a row and the start of the next look adjacent); the
    prefix positions sit at one place, and the segments of a demo pair share their cells' rotations."""
    side, prefix, head = 5, 2, 16
    torch.manual_seed(0)
    q, k = torch.randn(head), torch.randn(head)
    flat = RotaryEmbedding(head, prefix + side * side)
    grid = RotaryEmbedding(head, prefix + side * side, grid_side=side, grid_start=prefix)
    cell = lambda r, c: prefix + r * side + c  # noqa: E731
    below = [_rope_score(grid, q, k, cell(r, c), cell(r + 1, c)) for r in range(side - 1) for c in range(side)]
    assert max(below) - min(below) < 1e-4  # "one row down" is one relation everywhere
    assert abs(_rope_score(grid, q, k, cell(0, 0), cell(1, 0)) - _rope_score(grid, q, k, cell(0, 0), cell(0, 1))) > 1e-3
    wrap, step = _rope_score(flat, q, k, cell(0, side - 1), cell(1, 0)), _rope_score(flat, q, k, cell(2, 1), cell(2, 2))
    assert abs(wrap - step) < 1e-4  # 1-D: the row's last cell and the next row's first are neighbours
    assert abs(_rope_score(grid, q, k, cell(0, side - 1), cell(1, 0)) - _rope_score(grid, q, k, cell(2, 1), cell(2, 2))) > 1e-3
    cos, sin = grid()
    assert torch.equal(cos[0], cos[1]) and torch.equal(cos[0], torch.ones(head))  # the prefix: row 0, column 0
    pair = RotaryEmbedding(head, 2 * side * side, grid_side=side)
    assert torch.equal(pair.cos[: side * side], pair.cos[side * side :])  # input cell (r, c) = output cell (r, c)
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding(6, 10, grid_side=3)


def test_absolute_positions_add_trained_row_and_column_embeddings():
    """A pair and its upside-down copy (the gravity side, the ray direction flipped): with no attention layer a
    mean-pooled vector is a bag of tokens and cannot tell them apart, and additive row/column embeddings alone do
    not either (the mean of a sum separates); one block mixes colour with position, and the gradient reaches both
    tables."""
    import numpy as np

    from trm_lightning.data.tokenize import grid_to_canvas

    grid_in = np.zeros((4, 3), np.int64)
    grid_in[1, 1], grid_in[2, 0] = 3, 5
    grid_out = grid_in.copy()
    grid_out[3, :] = 7  # something lands at the bottom
    canvas = lambda g: torch.from_numpy(grid_to_canvas(g, S).astype("int32"))  # noqa: E731
    di = torch.stack([canvas(grid_in), canvas(grid_in[::-1])]).view(2, 1, S * S)
    do = torch.stack([canvas(grid_out), canvas(grid_out[::-1])]).view(2, 1, S * S)
    mask = torch.ones(2, 1, dtype=torch.bool)
    for absolute in (False, True):
        bag = _encoder(num_layers=0, absolute_positions=absolute).encode(di, do, mask)
        assert torch.allclose(bag[0], bag[1], atol=1e-6)
    base, placed = _encoder(num_layers=1), _encoder(num_layers=1, absolute_positions=True)
    out = placed.encode(di, do, mask)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    assert not torch.allclose(out, base.encode(di, do, mask), atol=1e-3)
    out.square().sum().backward()
    for name in ("row_embed", "col_embed"):
        weight = getattr(placed.grid_encoder, name).weight
        assert weight.grad is not None and float(weight.grad.abs().sum()) > 0, name
