"""Perplexity methods (pretrain/perplexity.py, shared by training validation and the evaluation tool)
against hand-computed small cases (no model, plain-Python reference)."""

import math

import pytest
import torch

from pretrain.perplexity import perplexity, plan_windows, window_nll

V = 5
STREAM = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 1]  # 11 tokens


def toy_logits(x: torch.Tensor) -> torch.Tensor:
    """Position-dependent toy LM: logit 0.5*p for the current token, 0.1*v elsewhere."""
    b, s = x.shape
    logits = 0.1 * torch.arange(V, dtype=torch.float64).expand(b, s, V).clone()
    for p in range(s):
        logits[torch.arange(b), p, x[:, p]] = 0.5 * p
    return logits


def reference_nll(window_start: int, pos: int) -> float:
    """-log p(target) for the prediction at `pos` of the window starting at `window_start`, by hand."""
    current, target = STREAM[window_start + pos], STREAM[window_start + pos + 1]
    logits = [0.5 * pos if v == current else 0.1 * v for v in range(V)]
    return -(logits[target] - math.log(sum(math.exp(l) for l in logits)))


def reference_ppl(scored: list[tuple[int, int]]) -> float:
    return math.exp(sum(reference_nll(s, p) for s, p in scored) / len(scored))


def test_nonoverlapping_matches_hand_computation():
    # length 4 over 11 tokens: windows at 0 and 4 (a window at 8 would need 5 tokens), all positions scored
    scored = [(0, p) for p in range(4)] + [(4, p) for p in range(4)]
    res = perplexity(toy_logits, torch.tensor(STREAM), 4, method="nonoverlapping", batch_size=1)
    assert res.tokens == 8
    assert res.ppl == pytest.approx(reference_ppl(scored), rel=1e-12)


def test_sliding_matches_hand_computation():
    # stride 2: windows at 0, 2, 4, 6; the first scores 4 predictions, the others their last 2
    scored = [(0, p) for p in range(4)] + [(s, p) for s in (2, 4, 6) for p in (2, 3)]
    res = perplexity(toy_logits, torch.tensor(STREAM), 4, method="sliding", stride=2, batch_size=3)
    assert res.tokens == 10
    assert res.ppl == pytest.approx(reference_ppl(scored), rel=1e-12)
    assert res.ppl != pytest.approx(perplexity(toy_logits, torch.tensor(STREAM), 4).ppl, rel=1e-6)


def test_sliding_with_stride_equal_length_is_nonoverlapping_and_batching_is_exact():
    torch.manual_seed(0)
    stream = torch.randint(0, V, (97,))
    a = perplexity(toy_logits, stream, 8, method="nonoverlapping", batch_size=1)
    b = perplexity(toy_logits, stream, 8, method="sliding", stride=8, batch_size=5)
    assert (a.tokens, a.ppl) == (b.tokens, pytest.approx(b.ppl, rel=1e-12))


def test_uniform_model_has_perplexity_vocab_size():
    uniform = lambda x: torch.zeros(*x.shape, V)  # noqa: E731
    assert perplexity(uniform, torch.tensor(STREAM), 3).ppl == pytest.approx(V)


def test_bad_requests_say_what_to_change():
    with pytest.raises(ValueError, match="fewer than length"):
        plan_windows(10, 16, "nonoverlapping", None)
    with pytest.raises(ValueError, match="only applies to --method sliding"):
        plan_windows(100, 16, "nonoverlapping", 4)
    with pytest.raises(ValueError, match=r"must be in \[1, length"):
        plan_windows(100, 16, "sliding", 32)


def test_nonoverlapping_nll_batches_windows_in_order():
    tokens = torch.arange(11)  # windows of 3: inputs 0-2, 3-5, 6-8; targets 1..9 (token 10 unused)
    seen = []

    def nll(x, y):
        seen.append((x.tolist(), y.tolist()))
        return y.float() / 10  # NLL of target t is t/10

    assert window_nll(nll, tokens, 3, batch_size=2).ppl == pytest.approx(math.exp(sum(range(1, 10)) / 90))
    assert seen[0] == ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]]) and seen[1] == ([[6, 7, 8]], [[7, 8, 9]])
