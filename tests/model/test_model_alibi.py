"""ALiBi slopes and bias against the paper's values and a brute-force loop."""

import math

import pytest
import torch

from pretrain.model import alibi_bias, alibi_slopes, rank_slopes

# The paper's slopes written out as exponents of 2 (Press et al. 2022, Sec. 3 and the official
# code's non-power-of-two rule): n=8 -> 2^-1 .. 2^-8; n=16 -> 2^-0.5 .. 2^-8;
# n=12 -> the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (every other 16-head slope);
# n=20 / 24 -> the 16-head slopes, then 2^-0.25, 2^-0.75, ... (every other 32-head slope).
EXPONENTS = {
    8: [1, 2, 3, 4, 5, 6, 7, 8],
    16: [0.5 * k for k in range(1, 17)],
    12: [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5],
    20: [0.5 * k for k in range(1, 17)] + [0.25, 0.75, 1.25, 1.75],
    24: [0.5 * k for k in range(1, 17)] + [0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75],
}


@pytest.mark.parametrize("n", sorted(EXPONENTS))
def test_slopes_match_paper(n):
    expected = [2.0 ** -e for e in EXPONENTS[n]]
    assert alibi_slopes(n) == pytest.approx(expected, rel=1e-12)


def test_slopes_tp_slices_the_global_sequence():
    # 12 heads on 2 ranks: rank 1 owns global heads 6..11, NOT the 6-head slopes.
    assert torch.cat([rank_slopes(12, 2, r) for r in range(2)]).tolist() == pytest.approx(alibi_slopes(12))
    assert rank_slopes(12, 2, 1).tolist() == pytest.approx(alibi_slopes(12)[6:])
    assert rank_slopes(12, 2, 1).tolist() != pytest.approx(alibi_slopes(6))
    with pytest.raises(ValueError, match="not divisible"):
        rank_slopes(12, 5, 0)
    with pytest.raises(ValueError, match="positive"):
        alibi_slopes(0)


@pytest.mark.parametrize("causal", [True, False])
def test_bias_matches_loop(causal):
    slopes = torch.tensor(alibi_slopes(12)[:3])
    q_len, k_len = 5, 7  # queries are the last 5 of 7 positions
    bias = alibi_bias(slopes, q_len, k_len, causal=causal)
    assert bias.dtype == torch.float32 and bias.shape == (3, q_len, k_len)
    for h in range(3):
        for qi in range(q_len):
            i = qi + k_len - q_len
            for j in range(k_len):
                if causal and j > i:
                    assert bias[h, qi, j] == float("-inf")
                else:
                    want = -slopes[h].item() * (abs(i - j) if not causal else (i - j))
                    assert bias[h, qi, j].item() == pytest.approx(want, rel=1e-6)
    if not causal:  # symmetric, no mask
        square = alibi_bias(slopes, 6, 6, causal=False)
        assert torch.equal(square, square.transpose(1, 2)) and torch.isfinite(square).all()


def test_bias_is_exact_fp32_at_long_positions():
    # The relative fp32 form keeps -m(i-j) to fp32 rounding at 16k tokens (bf16 would step by 64).
    slopes = torch.tensor([2.0 ** -0.5, 2.0 ** -7.5])
    s = 16384
    bias = alibi_bias(slopes, 1, s, causal=True)[:, 0]  # last query row [h, s]
    dist = torch.arange(s - 1, -1, -1, dtype=torch.float64)
    want = -torch.tensor([2.0 ** -0.5, 2.0 ** -7.5], dtype=torch.float64)[:, None] * dist
    rel = ((bias.double() - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert rel < 2 ** -22, rel  # two fp32 roundings (slope, product)
    assert math.isclose(bias[0, 0].item(), -(2 ** -0.5) * (s - 1), rel_tol=1e-7)
