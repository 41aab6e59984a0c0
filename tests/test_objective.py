"""Tests for the AutoFT composite objective: hand-computed values, gradient routing, theta0 semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoft import objective
from autoft.objective import (
    LOSS_TERMS,
    CompositeObjective,
    ce_loss,
    dcm_loss,
    entropy_loss,
    flyp_loss,
    hinge_loss,
    norm_terms,
)

# Shared example: row 0 is correct (argmax 0 == 0), row 1 is wrong (argmax 2 != 1).
LOGITS = [[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]
LABELS = [0, 1]
LSE0 = math.log(math.exp(2) + math.exp(0) + math.exp(-1))
LSE1 = math.log(math.exp(0) + math.exp(1) + math.exp(3))

# CE per row = logsumexp(z) - z_y.
CE = ((LSE0 - 2) + (LSE1 - 1)) / 2
# Hinge: row 0: relu(0-2+1) + relu(-1-2+1) = 0; row 1: relu(0-1+1) + relu(3-1+1) = 3.
HINGE = (0 + 3) / 2


def _entropy(z: list[float], lse: float) -> float:
    # H = -sum p log p with log p_j = z_j - lse.
    return -sum(math.exp(zj - lse) * (zj - lse) for zj in z)


ENTROPY = (_entropy(LOGITS[0], LSE0) + _entropy(LOGITS[1], LSE1)) / 2
# DCM: only row 1; -(1/3) sum_j (z_j - lse) - log 3 = -(0+1+3)/3 + lse - log 3, summed and divided by B=2.
DCM = (-(4 / 3) + LSE1 - math.log(3)) / 2

# FLYP: image features [[2,0],[0,0.5]] -> normalized identity; captions [[3,4],[0,2]] -> [[.6,.8],[0,1]].
# Scale 2 -> logits [[1.2, 0], [1.6, 2]]; rows target the diagonal, columns too.
_rows = (math.log(math.exp(1.2) + 1) - 1.2) + (math.log(math.exp(1.6) + math.exp(2)) - 2)
_cols = (math.log(math.exp(1.2) + math.exp(1.6)) - 1.2) + (math.log(1 + math.exp(2)) - 2)
FLYP = (_rows / 2 + _cols / 2) / 2

# Norm terms: two parameters, shifted from theta0 by a known delta.
A0, B0 = [[1.0, -2.0], [3.0, 0.0]], [0.5, -1.5]
DA, DB = [[0.5, 0.0], [0.0, -1.0]], [2.0, 0.0]
# After the shift: a = [[1.5,-2],[3,-1]], b = [2.5,-1.5].
L1INIT = 0.5 + 1.0 + 2.0
L2INIT = 0.25 + 1.0 + 4.0
L1ZERO = 1.5 + 2 + 3 + 1 + 2.5 + 1.5
L2ZERO = 2.25 + 4 + 9 + 1 + 6.25 + 2.25
HAND = {
    "ce": CE, "hinge": HINGE, "entropy": ENTROPY, "dcm": DCM, "flyp": FLYP,
    "l1init": L1INIT, "l2init": L2INIT, "l1zero": L1ZERO, "l2zero": L2ZERO,
}


def _logits(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=torch.float64, requires_grad=requires_grad)


def _labels() -> torch.Tensor:
    return torch.tensor(LABELS)


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    txt = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    return img, txt


def _shifted_params() -> tuple[nn.Parameter, nn.Parameter, list[torch.Tensor]]:
    """Two parameters at A0/B0, theta0 copies, then the parameters shifted in place by DA/DB."""
    a = nn.Parameter(torch.tensor(A0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(B0, dtype=torch.float64))
    theta0 = [a.detach().clone(), b.detach().clone()]
    with torch.no_grad():
        a.add_(torch.tensor(DA, dtype=torch.float64))
        b.add_(torch.tensor(DB, dtype=torch.float64))
    return a, b, theta0


def _close(t: torch.Tensor, expected: float) -> None:
    assert t.ndim == 0
    assert t.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


# 1. Every term against a hand-computed value.


def test_classification_terms_match_hand_values() -> None:
    _close(ce_loss(_logits(), _labels()), CE)
    _close(hinge_loss(_logits(), _labels()), HINGE)
    _close(entropy_loss(_logits()), ENTROPY)
    _close(dcm_loss(_logits(), _labels()), DCM)


def test_dcm_zero_when_correct_or_uniform_and_nonnegative() -> None:
    _close(dcm_loss(_logits(), torch.tensor([0, 2])), 0.0)
    # Misclassified (argmax ties to 0, label 1) but already uniform: KL(uniform || uniform) = 0.
    _close(dcm_loss(torch.zeros(2, 3), torch.tensor([1, 1])), 0.0)
    torch.manual_seed(0)
    assert dcm_loss(torch.randn(16, 5), torch.randint(0, 5, (16,))).item() > 0.0


def test_flyp_matches_hand_value_and_normalizes() -> None:
    img, txt = _features()
    _close(flyp_loss(img, txt, 2.0), FLYP)
    _close(flyp_loss(img, txt, torch.tensor(2.0, dtype=torch.float64)), FLYP)
    # Already-normalized inputs give the same value (normalization is idempotent).
    _close(flyp_loss(img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True), 2.0), FLYP)


def test_norm_terms_function_matches_hand_values() -> None:
    a, b, theta0 = _shifted_params()
    out = norm_terms([a, b], theta0, ["l1init", "l2init", "l1zero", "l2zero"])
    assert set(out) == {"l1init", "l2init", "l1zero", "l2zero"}
    for name in out:
        _close(out[name], HAND[name])
    assert set(norm_terms([a, b], None, ["l2zero"])) == {"l2zero"}
    with pytest.raises(ValueError, match="theta0"):
        norm_terms([a, b], None, ["l1init"])


def test_objective_norm_terms_match_hand_values() -> None:
    a = nn.Parameter(torch.tensor(A0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(B0, dtype=torch.float64))
    obj = CompositeObjective({"l1init": 1, "l2init": 1, "l1zero": 1, "l2zero": 1}, [("a", a), ("b", b)])
    with torch.no_grad():  # an "optimizer step" after theta0 was taken
        a.add_(torch.tensor(DA, dtype=torch.float64))
        b.add_(torch.tensor(DB, dtype=torch.float64))
    _, values = obj(_logits(), _labels())
    for name in ("l1init", "l2init", "l1zero", "l2zero"):
        _close(values[name], HAND[name])


# 2. Total is the weighted sum; zero-weight terms are neither returned nor computed.


def test_total_is_weighted_sum_of_all_terms() -> None:
    a, b, _ = _shifted_params()
    weights = {t: 0.1 * (i + 1) for i, t in enumerate(LOSS_TERMS)}
    obj = CompositeObjective(weights, [("a", a), ("b", b)])
    with torch.no_grad():  # shift theta0 back so the init terms see the known delta
        obj.theta0[0].sub_(torch.tensor(DA, dtype=torch.float64))
        obj.theta0[1].sub_(torch.tensor(DB, dtype=torch.float64))
    img, txt = _features()
    total, values = obj(_logits(), _labels(), image_features=img, text_features=txt, logit_scale=2.0)
    assert set(values) == set(LOSS_TERMS)
    for name, v in values.items():
        _close(v, HAND[name])
        assert not v.requires_grad
    _close(total, sum(weights[t] * HAND[t] for t in LOSS_TERMS))
    assert obj.active_terms == LOSS_TERMS
    assert obj.needs_text


def test_zero_weight_terms_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a zero-weight term was computed")

    for name in ("hinge_loss", "entropy_loss", "flyp_loss", "norm_terms"):
        monkeypatch.setattr(objective, name, boom)
    lin = nn.Linear(2, 2)
    obj = CompositeObjective({"hinge": 0.0, "dcm": 0.5}, lin.named_parameters())
    assert obj.weights == {**dict.fromkeys(LOSS_TERMS, 0.0), "ce": 1.0, "dcm": 0.5}
    assert obj.active_terms == ("ce", "dcm")
    assert not obj.needs_text
    assert obj.theta0 is None
    img, txt = _features()
    total, values = obj(_logits(), _labels(), image_features=img, text_features=txt, logit_scale=2.0)
    assert set(values) == {"ce", "dcm"}
    _close(total, CE + 0.5 * DCM)


def test_only_requested_norm_terms_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[tuple[str, ...]] = []
    real = objective.norm_terms

    def spy(params, theta0, terms):  # type: ignore[no-untyped-def]
        requested.append(tuple(terms))
        return real(params, theta0, terms)

    monkeypatch.setattr(objective, "norm_terms", spy)
    obj = CompositeObjective({"ce": 0.0, "l2zero": 1.0}, nn.Linear(2, 2).named_parameters())
    _, values = obj(_logits(), _labels())
    assert requested == [("l2zero",)]
    assert set(values) == {"l2zero"}


# 3. Gradients flow only where they should.


def test_theta0_buffers_get_no_grad_and_objective_owns_no_parameters() -> None:
    lin = nn.Linear(3, 2)
    obj = CompositeObjective({"l2init": 1.0, "l1init": 1.0}, lin.named_parameters())
    assert list(obj.parameters()) == []
    assert obj.state_dict() == {}  # non-persistent: not checkpointed
    assert len(obj.theta0) == 2
    assert all(not t.requires_grad for t in obj.theta0)
    with torch.no_grad():
        lin.weight.add_(0.1)
    logits = lin(torch.randn(4, 3))
    total, _ = obj(logits, torch.tensor([0, 1, 0, 1]))
    total.backward()
    assert all(t.grad is None for t in obj.theta0)
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_frozen_parameter_is_excluded() -> None:
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
        lin.bias.copy_(torch.tensor([10.0, 10.0]))
    lin.bias.requires_grad_(False)
    obj = CompositeObjective({"ce": 0.0, "l2zero": 1.0, "l1init": 1.0}, lin.named_parameters())
    assert len(obj.params) == 1 and obj.params[0] is lin.weight
    assert len(obj.theta0) == 1
    _, values = obj(_logits(), _labels())
    _close(values["l2zero"], 1 + 4 + 0.25)  # bias (10^2 + 10^2) not included


def test_dcm_gives_zero_grad_to_correct_rows() -> None:
    logits = _logits(requires_grad=True)
    dcm_loss(logits, _labels()).backward()
    assert torch.all(logits.grad[0] == 0)
    assert torch.any(logits.grad[1] != 0)
    # Pushing toward uniform: the gradient lowers the top (wrong) logit.
    assert logits.grad[1, 2] > 0


def test_flyp_grads_reach_only_image_side_when_text_is_frozen() -> None:
    img_leaf = torch.tensor([[2.0, 0.0], [0.0, 0.5]], requires_grad=True)
    text_proj = torch.tensor([[1.0, 0.5], [0.2, 1.0]], requires_grad=True)
    with torch.no_grad():
        txt = torch.tensor([[3.0, 4.0], [0.0, 2.0]]) @ text_proj
    obj = CompositeObjective({"ce": 0.0, "flyp": 1.0}, [])
    total, _ = obj(torch.zeros(2, 3), _labels(), image_features=img_leaf * 1.0, text_features=txt,
                   logit_scale=2.0)
    total.backward()
    assert img_leaf.grad is not None and img_leaf.grad.abs().sum() > 0
    assert text_proj.grad is None
    assert not txt.requires_grad


def test_norm_terms_float32_under_autocast() -> None:
    lin = nn.Linear(4, 3)
    obj = CompositeObjective({"l2init": 1.0, "l1zero": 1.0}, lin.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(torch.randn(2, 4))
        total, values = obj(logits, torch.tensor([0, 1]))
    assert logits.dtype == torch.bfloat16  # autocast really was on
    assert values["l2init"].dtype == torch.float32
    assert values["l1zero"].dtype == torch.float32
    assert torch.isfinite(total)


def test_theta0_moves_with_to() -> None:
    lin = nn.Linear(2, 2)
    obj = CompositeObjective({"l2init": 1.0}, lin.named_parameters())
    obj.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in obj.theta0)
    assert lin.weight.dtype == torch.float32  # the model is not the objective's to move


# 4. theta0 is a real copy.


def test_theta0_is_a_copy_not_an_alias() -> None:
    lin = nn.Linear(3, 2)
    obj = CompositeObjective({"l2init": 1.0}, lin.named_parameters())
    before = [t.clone() for t in obj.theta0]
    for t, p in zip(obj.theta0, obj.params, strict=True):
        assert t.data_ptr() != p.data_ptr()
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    for t, b in zip(obj.theta0, before, strict=True):
        assert torch.equal(t, b)


# 5. l2init is 0 at step 0 and > 0 after one AdamW step.


def test_l2init_zero_at_start_positive_after_one_step() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    obj = CompositeObjective({"ce": 1.0, "l2init": 1.0}, lin.named_parameters())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    total, values = obj(lin(x), y)
    assert values["l2init"].item() == 0.0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())
    opt.step()
    _, values = obj(lin(x), y)
    assert values["l2init"].item() > 0.0


# 6. A large l2init weight keeps the weights close to theta0.


def _finetune_distance(l2init: float) -> float:
    torch.manual_seed(0)
    lin = nn.Linear(8, 3)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    start = [p.detach().clone() for p in lin.parameters()]
    obj = CompositeObjective({"ce": 1.0, "l2init": l2init}, lin.named_parameters())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(30):
        opt.zero_grad()
        total, _ = obj(lin(x), y)
        total.backward()
        opt.step()
    deltas = [p.detach() - s for p, s in zip(lin.parameters(), start, strict=True)]
    return math.sqrt(sum((d**2).sum().item() for d in deltas))


def test_large_l2init_weight_keeps_weights_near_theta0() -> None:
    free = _finetune_distance(0.0)
    anchored = _finetune_distance(10.0)
    assert free > 0
    assert anchored * 2 <= free


# 7. Validation.


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"foo": 1.0}, "'foo'.*valid terms: ce, hinge"),
        ({"hinge": -0.1}, "'hinge'"),
        ({"entropy": float("nan")}, "'entropy'"),
        ({"l2init": float("inf")}, "'l2init'"),
        ({"ce": 0.0}, "all loss weights are zero"),
    ],
)
def test_invalid_weights_raise(weights: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CompositeObjective(weights, [])


def test_flyp_without_features_raises() -> None:
    obj = CompositeObjective({"flyp": 0.5}, [])
    img, txt = _features()
    with pytest.raises(ValueError, match="flyp"):
        obj(_logits(), _labels())
    with pytest.raises(ValueError, match="flyp"):
        obj(_logits(), _labels(), image_features=img, text_features=txt)  # no logit_scale


# 8. reset_theta0.


def test_reset_theta0_zeroes_l2init_again() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    obj = CompositeObjective({"l2init": 1.0}, lin.named_parameters())
    buffers = obj.theta0
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        total, _ = obj(lin(x), y)
        total.backward()
        opt.step()
    assert obj(lin(x), y)[1]["l2init"].item() > 0
    obj.reset_theta0()
    assert obj(lin(x), y)[1]["l2init"].item() == 0.0
    assert all(a is b for a, b in zip(obj.theta0, buffers, strict=True))  # updated in place
    for t, p in zip(obj.theta0, obj.params, strict=True):
        assert t.data_ptr() != p.data_ptr()


def test_reset_theta0_is_noop_without_init_terms() -> None:
    obj = CompositeObjective({"l2zero": 1.0}, nn.Linear(2, 2).named_parameters())
    obj.reset_theta0()
    assert obj.theta0 is None


@pytest.mark.parametrize(
    "weights",
    [
        {"l1init": 0.3, "l2init": 0.5, "l1zero": 0.01, "l2zero": 0.02},
        {"ce": 0.0, "l2init": 1.0, "l1zero": 0.1},
        {"hinge": 0.5, "l1init": 2.0},
    ],
)
@pytest.mark.xdist_group("compiled")  # torch.compile's first compile in a process (about 12 s cold): on one worker
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_closed_form_norm_grads_match_autograd(weights: dict[str, float], compiled: bool) -> None:
    """k AdamW steps with the norm terms' gradients added in closed form land where autograd's do, eager
    and through the compiled one-pass function (compiled once for all weights: they are a tensor input)."""
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3

    def train(closed: bool, weights: dict[str, float] = weights) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        obj = CompositeObjective(weights, model.named_parameters(), closed_form_norms=closed,
                                 compile_norm_grads=closed and compiled)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(6):
            opt.zero_grad()
            loss, values = obj(model(x), y)
            loss.backward()
            obj.add_norm_grads()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], values

    auto, auto_values = train(False)
    if compiled:  # compiled first for another weight set, from an empty cache: another test's compile (float64
        torch._dynamo.reset()  # tensors, in the same pytest worker) must not be what this one finds
        train(True, {"l1init": 1.0, "l2init": 1.0, "l1zero": 1.0, "l2zero": 1.0})
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new weight set must not recompile
        closed, closed_values = train(True)
    torch.manual_seed(1)
    init = [p.detach() for p in nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).parameters()]
    assert min((a - p0).abs().max().item() for a, p0 in zip(auto, init, strict=True)) > 1e-3  # it trained
    for a, c in zip(auto, closed, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    assert closed_values.keys() == auto_values.keys()
    for k in auto_values:
        torch.testing.assert_close(closed_values[k], auto_values[k], rtol=1e-5, atol=1e-6)


def test_closed_form_leaves_norms_out_of_the_loss_and_skips_their_values_on_request() -> None:
    lin = nn.Linear(3, 2)
    obj = CompositeObjective({"ce": 1.0, "l2zero": 0.5}, lin.named_parameters(), closed_form_norms=True)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    total, values = obj(lin(x), y, norm_values=False)
    assert set(values) == {"ce"}
    torch.testing.assert_close(total, values["ce"])
    total, values = obj(lin(x), y)
    expected = sum(p.detach().square().sum() for p in lin.parameters())
    torch.testing.assert_close(values["l2zero"], expected)
    torch.testing.assert_close(total, values["ce"])  # the norm term's gradient is added, not backpropagated
    total.backward()
    ce_grad = lin.weight.grad.clone()
    obj.add_norm_grads()
    torch.testing.assert_close(lin.weight.grad, ce_grad + 2 * 0.5 * lin.weight.detach())


def test_closed_form_norm_grads_on_cpu_blocks_and_channels_last_weights() -> None:
    """The CPU path splits large tensors into cache-sized blocks and keeps non-contiguous (channels_last)
    weights whole: the gradients it adds equal autograd's of the same norm terms."""
    from autoft.norm_grads import CPU_BLOCK, coefficients, foreach_norm_grads

    torch.manual_seed(0)
    big = nn.Linear(CPU_BLOCK // 500 + 7, 500)  # > CPU_BLOCK weights: several blocks, the last partial
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    params = [*big.parameters(), *conv.parameters()]
    assert big.weight.numel() > CPU_BLOCK and not conv.weight.is_contiguous()
    weights = {"ce": 0.0, "l1init": 0.3, "l2init": 0.5, "l1zero": 0.01, "l2zero": 0.02}
    obj = CompositeObjective(weights, [*big.named_parameters(), *conv.named_parameters()], closed_form_norms=True)
    with torch.no_grad():
        for p in params:  # move away from theta0, so every term has a non-zero gradient
            p.add_(torch.randn_like(p))
    terms = norm_terms(params, obj.theta0, ("l1init", "l2init", "l1zero", "l2zero"))
    expected = torch.autograd.grad(sum(weights[t] * v for t, v in terms.items()), params)
    obj.add_norm_grads()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    # the GPU path (fused foreach ops) on the same tensors, with the coefficients add_norm_grads uses
    grads = [torch.zeros_like(p) for p in params]
    foreach_norm_grads(grads, params, obj.theta0, *coefficients(obj.weights))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU's fused foreach path)")
@pytest.mark.parametrize("compiled", [False, True], ids=["foreach", "compiled"])
def test_closed_form_norm_grads_on_cuda_match_autograd_under_bf16_autocast(compiled: bool) -> None:
    """On CUDA, add_norm_grads takes the fused foreach path (or the compiled one-pass function): after
    training steps under bf16 autocast (as Lightning's bf16-mixed runs them) the parameters land where
    autograd's norm terms put them."""
    weights = {"ce": 1.0, "l1init": 0.3, "l2init": 0.5, "l1zero": 0.01, "l2zero": 0.02}
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).cuda()
    y = (torch.arange(64) % 5).cuda()

    def train(closed: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 5)).cuda()
        obj = CompositeObjective(weights, model.named_parameters(), closed_form_norms=closed,
                                 compile_norm_grads=closed and compiled, norm_scale={"l1init": 2.0, "l2zero": 0.5})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        for _ in range(6):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = obj(model(x), y)
            loss.backward()
            obj.add_norm_grads()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    auto, closed = train(False), train(True)
    torch.manual_seed(1)
    init = [p.detach().cuda() for p in nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 5)).parameters()]
    assert min((a - p0).abs().max().item() for a, p0 in zip(auto, init, strict=True)) > 1e-3  # it trained
    for a, c in zip(auto, closed, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.xdist_group("compiled")
@pytest.mark.parametrize("path", ["cpu_blocks", "foreach", "compiled"])
def test_closed_form_l2init_keeps_small_moves_precise_in_float32(path: str) -> None:
    """Fine-tuning moves weights of size ~1 by far less: the l2init gradient 2 w (p - p0) must come from the
    difference, not from 2 w p - 2 w p0 (whose rounding is relative to |p|, here 1e4 times the move)."""
    from autoft.norm_grads import coefficients, foreach_norm_grads

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(0.5 + torch.rand(32, 64, generator=g))
    obj = CompositeObjective({"ce": 0.0, "l2init": 0.3}, lin.named_parameters(), closed_form_norms=True,
                             compile_norm_grads=path == "compiled")
    with torch.no_grad():
        lin.weight.add_(1e-4 * (torch.randint(0, 2, (32, 64), generator=g) * 2 - 1))
    exact = 2 * 0.3 * (lin.weight.double() - obj.theta0[0].double())
    if path == "foreach":  # the GPU path's ops, run on CPU tensors
        grads = [torch.zeros_like(p) for p in obj.params]
        foreach_norm_grads(grads, obj.params, obj.theta0, *coefficients(obj.groups[0].pull))
        got = grads[0]
    else:  # CPU blocks, or the compiled one-pass function
        obj.add_norm_grads()
        got = lin.weight.grad
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)
