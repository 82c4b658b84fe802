"""PGD math, perturbation spaces, BatchNorm handling and the attack's random stream (one process)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conadv_ds.adversary import Adversary
from conadv_ds.attacks import pgd, random_start, random_wrong_labels
from conadv_ds.batch import default_loss
from conadv_ds.bn import adversarial_branch, attack_bn_mode, convert_aux_bn
from conadv_ds.config import ConAdvConfig
from conadv_ds.perturb import EmbeddingSpace, PixelSpace, resolve_space
from tests.common import make_model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def linear_objective(w, y, sign=1.0):
    def objective(delta, x):
        return sign * F.cross_entropy((x + delta).flatten(1) @ w, y)
    return objective


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("start_random", [True, False])
def test_delta_stays_in_ball_and_range(norm, start_random):
    torch.manual_seed(0)
    x, y, w = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,)), torch.randn(192, 5)
    obj = linear_objective(w, y)
    eps = 0.3 if norm == "linf" else 2.0
    d = pgd(lambda d: obj(d, x), x, norm=norm, epsilon=eps, step_size=eps / 2, steps=5, start_random=start_random,
            generator=gen(), clip_range=(0.0, 1.0))
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
        assert d.abs().max() > eps / 2  # it moved
    else:
        norms = d.flatten(1).norm(dim=1)
        assert norms.max() <= eps + 1e-5 and norms.min() > eps / 4
    assert (x + d).min() >= 0 and (x + d).max() <= 1
    assert d.requires_grad is False


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_untargeted_attack_raises_the_loss(norm):
    torch.manual_seed(1)
    x, y, w = torch.rand(64, 10), torch.randint(0, 4, (64,)), torch.randn(10, 4)
    obj = linear_objective(w, y)
    d = pgd(lambda d: obj(d, x), x, norm=norm, epsilon=0.5, step_size=0.2, steps=3, start_random=False,
            generator=gen())
    assert obj(d, x) > obj(torch.zeros_like(x), x) + 0.05


def test_targeted_attack_raises_target_probability():
    torch.manual_seed(2)
    x, y, w = torch.rand(64, 10), torch.randint(0, 4, (64,)), torch.randn(10, 4)
    target = random_wrong_labels(y, 4, gen())
    obj = linear_objective(w, target, sign=-1.0)  # ascend minus CE to target = descend CE to target
    d = pgd(lambda d: obj(d, x), x, norm="linf", epsilon=0.3, step_size=0.1, steps=3, start_random=True,
            generator=gen())
    p_before = F.softmax(x @ w, 1).gather(1, target[:, None])
    p_after = F.softmax((x + d) @ w, 1).gather(1, target[:, None])
    assert (p_after > p_before).float().mean() > 0.9


def test_random_wrong_labels():
    y = torch.tensor([0, 1, 2, 3, -100, 9] * 50)
    t = random_wrong_labels(y, 10, gen(3))
    valid = y != -100
    assert (t[valid] != y[valid]).all() and (t[~valid] == -100).all()
    assert ((t >= 0) & (t < 10))[valid].all()
    assert len(set(t[y == 0].tolist())) > 5  # drawn, not a fixed shift


def test_l2_random_start_is_freelb_and_masked():
    """FreeLB's start: at every real position U(-1, 1)·ε/√(perturbed elements of its sample), so
    the start lies inside the ball; padding stays 0. A zero start, another law, or a box sized by
    all positions instead of the real ones fails."""
    from scipy.stats import kstest

    hidden, lengths = 8, torch.tensor([64, 40, 17, 9])
    x = torch.zeros(4, 64, hidden)
    mask = (torch.arange(64) < lengths[:, None]).unsqueeze(-1)
    d = random_start(x, "l2", 1.0, gen(), mask)
    assert (d * ~mask == 0).all()
    assert (d.flatten(1).norm(dim=1) <= 1.0).all()
    box = 1.0 / torch.sqrt(lengths.float() * hidden)  # U(-1,1)·ε/√(len·hidden)
    for i, n in enumerate(lengths.tolist()):
        u = d[i, :n] / box[i]  # the sample's draws rescaled to its box: U(-1, 1)
        assert (u != 0).all() and u.abs().max() <= 1 + 1e-6 and u.abs().max() > 0.8, i
    pooled = torch.cat([d[i, :n].flatten() / box[i] for i, n in enumerate(lengths.tolist())])
    assert kstest(pooled.numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3  # uniform over (-1, 1)


def _per_element_reference(x, mask, grad_of, epsilon, step_size, steps, seed):
    """Embedding-space L2 PGD with ε and step per element, written out: the ball of a sequence with
    L real tokens of width d has radius ε·√(L·d); the start is FreeLB's U(-1, 1)·ε·√(L·d)/√(L·d)."""
    m = mask.to(x.dtype).expand_as(x)
    root = m.flatten(1).sum(1).sqrt().view(-1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * m * epsilon
    for _ in range(steps):
        grad = grad_of(delta) * m
        delta = delta + step_size * root * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1)
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
        delta = delta * torch.clamp(epsilon * root / norm, max=1.0) * m
    return delta


@pytest.mark.parametrize("hidden", [8, 64])
def test_per_element_l2_matches_reference_and_means_the_same_at_any_width_and_length(hidden):
    torch.manual_seed(hidden)
    x = torch.randn(3, 10, hidden)
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] * 7 + [0] * 3]).unsqueeze(-1)
    w = torch.randn(hidden)
    obj = lambda d: ((x + d) @ w).pow(2).sum()  # noqa: E731
    grad_of = lambda d: torch.autograd.grad(obj(d.requires_grad_(True)), d)[0]  # noqa: E731
    d = pgd(obj, x, norm="l2", epsilon=0.05, step_size=0.05, steps=2, start_random=True,
            generator=torch.Generator().manual_seed(3), mask=mask, per_element=True)
    ref = _per_element_reference(x, mask, grad_of, 0.05, 0.05, 2, seed=3)
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-7)
    assert (d * (1 - mask) == 0).all()
    # on the sphere after two full steps: the RMS over the real tokens is ε whatever L and d are
    rms = (d.pow(2).flatten(1).sum(1) / (mask.flatten(1).sum(1) * hidden)).sqrt()
    torch.testing.assert_close(rms, torch.full((3,), 0.05), rtol=1e-5, atol=0)
    total = pgd(obj, x, norm="l2", epsilon=0.05, step_size=0.05, steps=2, start_random=True,
                generator=torch.Generator().manual_seed(3), mask=mask)
    assert total.flatten(1).norm(dim=1).max() <= 0.05 + 1e-6 < d.flatten(1).norm(dim=1).min()  # total: radius ε


def test_per_element_scale_reaches_the_attack_from_the_config():
    model = tiny_bert().eval()
    batch = {"input_ids": torch.randint(5, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "labels": torch.randint(5, 50, (2, 12))}
    batch["attention_mask"][1, 8:] = 0
    radius = {}
    for scale in ("total", "per_element"):
        cfg = ConAdvConfig(space="embedding", norm="l2", epsilon=0.02, step_size=0.02, targeted=False,
                           clean_start_prob=0.0, epsilon_scale=scale)
        d = Adversary(model, resolve_space(cfg, model), cfg, default_loss, rank=0)(batch, step=0, micro=0)
        radius[scale] = d.flatten(1).norm(dim=1)
    hidden = model.config.hidden_size
    expected = 0.02 * torch.tensor([12.0 * hidden, 8.0 * hidden]).sqrt()
    torch.testing.assert_close(radius["per_element"], expected, rtol=1e-4, atol=0)
    assert (radius["total"] <= 0.02 + 1e-6).all()


def test_masked_positions_never_move():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).unsqueeze(-1)
    obj = lambda d: ((x + d) ** 2).sum()  # noqa: E731
    for norm in ("linf", "l2"):
        d = pgd(obj, x, norm=norm, epsilon=0.5, step_size=0.3, steps=3, start_random=True, generator=gen(), mask=mask)
        assert (d * (1 - mask) == 0).all() and (d * mask).abs().sum() > 0


# -- BatchNorm -----------------------------------------------------------------------------------

def test_aux_bn_keeps_keys_and_separates_statistics():
    model = make_model()
    keys = set(model.state_dict())
    convert_aux_bn(model)
    new_keys = set(model.state_dict())
    assert keys < new_keys and all(".aux." in k for k in new_keys - keys)
    x = torch.rand(8, 1, 8, 8)
    main0, aux0 = model.bn1.running_mean.clone(), model.bn1.aux.running_mean.clone()
    with adversarial_branch(model):
        model(x)
    assert torch.equal(model.bn1.running_mean, main0) and not torch.equal(model.bn1.aux.running_mean, aux0)
    aux1 = model.bn1.aux.running_mean.clone()
    model(x)
    assert not torch.equal(model.bn1.running_mean, main0) and torch.equal(model.bn1.aux.running_mean, aux1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attack_bn_mode_restores_statistics_and_mode(mode):
    model = make_model().train()
    x = torch.rand(8, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with attack_bn_mode(model, mode):
        assert model.bn1.training == (mode == "train")
        out = model(x)
    assert model.bn1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    ref = model(x)
    assert torch.allclose(out, ref) == (mode == "eval")


# -- the adversary ---------------------------------------------------------------------------------

def adversary(model, **cfg):
    cfg = ConAdvConfig(**cfg)
    return Adversary(model, resolve_space(cfg, model, PixelSpace()), cfg, default_loss, rank=0)


def test_attack_stream_is_private_and_reproducible():
    model = make_model().train()
    batch = (torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    adv = adversary(model, clean_start_prob=0.0, epsilon=0.1, step_size=0.05)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    d1 = adv(batch, step=5, micro=0)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG did not move
    torch.manual_seed(999)
    assert torch.equal(adv(batch, step=5, micro=0), d1)  # independent of the global stream
    assert not torch.equal(adv(batch, step=6, micro=0), d1)
    assert not torch.equal(adv(batch, step=5, micro=1), d1)
    assert not torch.equal(Adversary(model, PixelSpace(), adv.cfg, default_loss, rank=1)(batch, 5, 0), d1)


def test_clean_start_probability_is_one_draw_per_batch():
    model = make_model().train()
    batch = (torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    # One step of 0.05 from δ=0 puts every coordinate at ±0.05 (or 0); from a random start
    # in [-0.1, 0.1] almost none lands there.
    adv = adversary(model, clean_start_prob=0.5, epsilon=0.1, step_size=0.05, clip_range=None)
    clean = []
    for step in range(40):
        d = adv(batch, step=step, micro=0)
        on_grid = torch.isclose(d.abs(), torch.tensor(0.05)) | (d == 0)
        clean.append(bool(on_grid.all()))
        assert on_grid.all() or (~on_grid).float().mean() > 0.9  # whole batch or nothing
    assert 8 <= sum(clean) <= 32


def test_default_targeted_attack_lowers_accuracy_on_a_trained_model():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x[:1024]), y[:1024]).backward()
        opt.step()
    model.eval()
    xt, yt = x[1024:], y[1024:]
    clean_acc = (model(xt).argmax(1) == yt).float().mean()
    adv = adversary(model, epsilon=0.15, step_size=0.05, steps=5, attack_bn="eval")
    delta = adv((xt, yt), step=0, micro=0)
    adv_acc = (model(xt + delta).argmax(1) == yt).float().mean()
    assert clean_acc > 0.85 and adv_acc < clean_acc - 0.2


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.3)
    return BertForMaskedLM(cfg)


def test_embedding_space_never_perturbs_padding_and_keeps_training_rng():
    model = tiny_bert().train()
    ids = torch.randint(5, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for norm, targeted in [("l2", False), ("linf", True)]:
        adv = Adversary(model, EmbeddingSpace().bind(model),
                        ConAdvConfig(space="embedding", norm=norm, targeted=targeted, epsilon=1.0, step_size=0.5,
                                     steps=2, clean_start_prob=0.0), default_loss, rank=0)
        torch.manual_seed(7)
        state = torch.get_rng_state()
        d = adv(batch, step=0, micro=0)
        assert torch.equal(torch.get_rng_state(), state)
        assert d.shape == (3, 10, 16)
        assert (d[mask == 0] == 0).all() and (d[mask == 1].abs().sum(-1) > 0).all()
        if norm == "l2":
            assert (d.flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()
    # The perturbed forward feeds inputs_embeds = embedding(ids) + δ.
    model.eval()
    out = EmbeddingSpace().bind(model).forward(model, batch, d)
    ref = model(inputs_embeds=model.get_input_embeddings()(ids) + d, attention_mask=mask, labels=labels)
    assert torch.allclose(out.logits, ref.logits)
    assert not torch.allclose(out.logits, model(**batch).logits)


def test_targeted_attack_on_a_causal_lm_uses_the_shifted_labels():
    """GPT-2: the targeted attack descends the cross-entropy between the logits at t and the
    wrong label drawn for t+1, as the causal LM's own loss pairs them. δ equals one targeted L2
    step written out with that shift (targets drawn from the attack's stream for (seed, step,
    micro-batch, rank)), and not the same step with logits and targets paired at one position."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conadv_ds.adversary import attack_seed

    torch.manual_seed(0)
    vocab = 50
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ids = torch.randint(0, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    cfg = ConAdvConfig(space="embedding", norm="l2", epsilon=1.0, step_size=0.5, steps=1, targeted=True,
                       clean_start_prob=1.0)
    delta = Adversary(model, resolve_space(cfg, model), cfg, default_loss, rank=1)(batch, step=3, micro=2)

    def written_out(shifted: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(attack_seed(cfg.seed, 3, 2, 1))
        labels = batch["labels"]
        target = (labels + torch.randint(1, vocab, labels.shape, generator=g)) % vocab  # a wrong label each
        target = torch.where(labels == -100, labels, target)
        emb = model.get_input_embeddings()(ids).detach()
        d = torch.zeros_like(emb, requires_grad=True)
        logits = model(inputs_embeds=emb + d, attention_mask=mask).logits
        if shifted:
            logits, target = logits[:, :-1], target[:, 1:]
        loss = -F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        (grad,) = torch.autograd.grad(loss, d)
        m = mask.unsqueeze(-1).float()
        grad = grad * m
        return (0.5 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1)) * m  # one step of 0.5 < ε: no projection

    assert model.config.model_type == "gpt2" and (delta[mask == 0] == 0).all()
    torch.testing.assert_close(delta, written_out(shifted=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(delta, written_out(shifted=False), atol=1e-3)


def test_embedding_space_needs_input_embeddings():
    from conadv_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="conadv.space='embedding'.*SmallCNN"):
        EmbeddingSpace().bind(make_model())


def test_official_defaults():
    c = ConAdvConfig()
    assert c.norm == "linf" and math.isclose(c.epsilon, 9 / 255) and math.isclose(c.step_size, 9 / 255)
    assert c.steps == 1 and c.targeted and c.clean_start_prob == 0.2 and c.staleness == 1
    assert c.schedule == "conadv" and c.stale_mechanism(whole_steps=True) == "lookahead"
    # clip range: [0, 1] for (images, labels) batches, none for dict batches and in embedding space
    pixel = resolve_space(c, make_model())
    assert pixel.clip_for((torch.zeros(1), torch.zeros(1))) == (0.0, 1.0) and pixel.clip_for({"pixel_values": 0}) is None
    assert resolve_space(ConAdvConfig(clip_range=None), make_model()).clip_for((0, 0)) is None
    assert resolve_space(ConAdvConfig(clip_range=[-1, 2]), make_model()).clip_for({}) == (-1.0, 2.0)


def test_pixel_space_with_parts_attacks_only_the_first_block():
    model = make_model().train()
    clean, aug = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    batch = (torch.cat([clean, aug]), torch.cat([y, y]))
    space = PixelSpace(parts=2)
    part = space.adversarial_part(batch)
    assert torch.equal(part[0], clean) and torch.equal(part[1], y)
    adv = Adversary(model, space, ConAdvConfig(epsilon=0.1, step_size=0.1), default_loss, rank=0)
    d = adv(batch, step=0, micro=0)
    assert d.shape == clean.shape
    assert torch.equal(d, Adversary(model, PixelSpace(), adv.cfg, default_loss, rank=0)((clean, y), 0, 0))


def test_embedding_evaluation_matches_a_written_out_attack():
    """evaluate_embedding's robust accuracy equals that of an untargeted per-element L2 PGD from δ = 0
    on `inputs_embeds` written here (padding unperturbed), at two ε; its clean accuracy is the argmax's."""
    from transformers import BertConfig, BertForSequenceClassification

    from conadv_ds.evaluation import evaluate_embedding

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                     max_position_embeddings=16)).eval()
    batches = []
    for _ in range(3):
        mask = torch.ones(8, 10, dtype=torch.long)
        mask[::2, 6:] = 0
        batches.append({"input_ids": torch.randint(5, 60, (8, 10)) * mask, "attention_mask": mask,
                        "labels": torch.randint(0, 3, (8,))})
    cfg = ConAdvConfig(space="embedding", norm="l2", epsilon_scale="per_element", epsilon=0.1, step_size=0.05,
                       steps=2, targeted=False, clean_start_prob=1.0)
    got = evaluate_embedding(model, batches, cfg, [0.1, 0.4])

    def robust(b, eps):
        emb = model.get_input_embeddings()(b["input_ids"]).detach()
        m = b["attention_mask"][..., None].float().expand_as(emb)
        root = m.flatten(1).sum(1).sqrt().view(-1, 1, 1)
        delta = torch.zeros_like(emb)
        for _ in range(2):
            delta.requires_grad_(True)
            out = model(inputs_embeds=emb + delta * m, attention_mask=b["attention_mask"], labels=b["labels"])
            (g,) = torch.autograd.grad(out.loss, delta)
            g = g * m
            with torch.no_grad():
                delta = delta + 0.5 * eps * root * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
                delta = delta * torch.clamp(eps * root / delta.flatten(1).norm(dim=1).view(-1, 1, 1), max=1.0) * m
        with torch.no_grad():
            out = model(inputs_embeds=emb + delta, attention_mask=b["attention_mask"], labels=b["labels"])
        return (out.logits.argmax(-1) == b["labels"]).sum().item(), out.loss.item() * 8

    with torch.no_grad():
        clean = sum((model(**b).logits.argmax(-1) == b["labels"]).sum().item() for b in batches)
    assert got["n"] == 24 and got["accuracy"] == clean / 24
    with torch.no_grad():
        assert got["loss"] == pytest.approx(sum(model(**b).loss.item() * 8 for b in batches) / 24, rel=1e-6)
    for eps in (0.1, 0.4):
        ref = [robust(b, eps) for b in batches]
        assert got[f"robust_accuracy@{eps:g}"] == sum(c for c, _ in ref) / 24
        assert got[f"robust_loss@{eps:g}"] == pytest.approx(sum(v for _, v in ref) / 24, rel=1e-5)
        assert got[f"robust_loss@{eps:g}"] > got["loss"]
    assert got["robust_accuracy@0.4"] < got["accuracy"]  # the reference attack bites at this ε
