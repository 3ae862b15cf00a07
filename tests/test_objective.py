"""The trainer's objectives (embedcore.train.objective) on one rank: the training loss is the op
over the whole batch with query b's positive at b * n; the validation metrics are each query
against its own group only, checked against a float64 computation written here."""
import pytest
import torch
import torch.nn.functional as F

from tolerance import backends_to_test

from embedcore.distributed import DistInfo
from embedcore.train.objective import ColbertObjective, PooledObjective

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
T = 0.3


def _tokens(N, L, D, g):
    tok = F.normalize(torch.randn(N, L, D, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return tok, mask


def _maxsim(q, qm, p, pm):
    """[Bq, Pp] sum over real query tokens of the max over real passage tokens."""
    sim = torch.einsum("bid,jtd->bjit", q, p).masked_fill(pm[None, :, None, :] == 0, float("-inf"))
    return (sim.amax(-1) * qm[:, None, :]).sum(-1)


def _group_reference(scores_of_group, B, G):
    losses, ranks = [], []
    for i in range(B):
        s = scores_of_group(i) / T  # [G], positive first
        losses.append(torch.logsumexp(s, 0) - s[0])
        ranks.append(1 + int((s[1:] > s[0]).sum()))
    return torch.stack(losses), torch.tensor(ranks)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_colbert_group_metrics_see_only_the_own_group(backend):
    g = torch.Generator().manual_seed(0)
    B, G = 3, 4
    q, qm = _tokens(B, 5, 8, g)
    p, pm = _tokens(B * G, 7, 8, g)
    losses, ranks = ColbertObjective(T, max_passage_len=7, backend=backend).group_metrics(q, qm, p, pm)
    want_l, want_r = _group_reference(lambda i: _maxsim(q[i:i + 1], qm[i:i + 1], p[i * G:(i + 1) * G],
                                                        pm[i * G:(i + 1) * G])[0], B, G)
    torch.testing.assert_close(losses.double(), want_l, rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks, want_r)
    # the whole-batch loss differs: other groups' passages are negatives there (the test is not vacuous)
    whole = ColbertObjective(T, max_passage_len=7, backend=backend).train_loss(q, qm, p, pm, None, ONE_RANK)
    assert not torch.allclose(whole.double(), want_l.mean())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_pooled_group_metrics_see_only_the_own_group(backend):
    g = torch.Generator().manual_seed(1)
    B, G = 4, 3
    q = F.normalize(torch.randn(B, 6, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(B * G, 6, generator=g, dtype=torch.float64), dim=-1)
    losses, ranks = PooledObjective(T, backend=backend).group_metrics(q, None, p, None)
    want_l, want_r = _group_reference(lambda i: p[i * G:(i + 1) * G] @ q[i], B, G)
    torch.testing.assert_close(losses.double(), want_l, rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks, want_r)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_colbert_train_loss_masks_copies_of_the_positive(backend):
    g = torch.Generator().manual_seed(2)
    B, n = 2, 3
    q, qm = _tokens(B, 4, 8, g)
    p, pm = _tokens(B * n, 6, 8, g)
    ids = torch.tensor([10, 11, 12, 13, 10, 14])  # passage 4 is a copy of query 0's positive
    got = ColbertObjective(T, max_passage_len=6, backend=backend).train_loss(q, qm, p, pm, ids, ONE_RANK)
    s = _maxsim(q, qm, p, pm) / T
    s[0, 4] = float("-inf")
    want = (torch.logsumexp(s, 1) - s[torch.arange(B), torch.tensor([0, n])]).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the loss: section's terms
class Loss:
    """A stand-in for the config's loss: section (the objective reads these attributes only)."""

    def __init__(self, **kw):
        self.matryoshka_dims = self.matryoshka_weights = None
        self.false_negative_margin = self.false_negative_delta = None
        self.symmetric_weight = self.distill_weight = 0.0
        self.distill_temperature = 1.0
        self.__dict__.update(kw)


def _ce(s, pos, excluded):
    """mean over rows of logsumexp over kept columns - s[pos], float64."""
    out = []
    for i in range(s.shape[0]):
        kept = [j for j in range(s.shape[1]) if j == pos[i] or not excluded[i][j]]
        out.append(torch.logsumexp(s[i, kept], 0) - s[i, pos[i]])
    return torch.stack(out).mean()


def _variant(a, b, pos, ids, L):
    """The configured InfoNCE of rows a against candidates b, written out pair by pair."""
    dims = L.matryoshka_dims or [a.shape[1]]
    weights = L.matryoshka_weights or [1.0] * len(dims)
    total = 0
    for d, w in zip(dims, weights):
        an = F.normalize(a[:, :d], dim=-1) if L.matryoshka_dims else a
        bn = F.normalize(b[:, :d], dim=-1) if L.matryoshka_dims else b
        c = an @ bn.T
        excluded = [[ids is not None and j != pos[i] and ids[j] == ids[pos[i]] for j in range(b.shape[0])]
                    for i in range(a.shape[0])]
        for i in range(a.shape[0]):
            thr = float("inf")
            if L.false_negative_margin is not None:
                thr = min(thr, L.false_negative_margin * float(c[i, pos[i]].detach()))
            if L.false_negative_delta is not None:
                thr = min(thr, float(c[i, pos[i]].detach()) - L.false_negative_delta)
            for j in range(b.shape[0]):
                excluded[i][j] |= j != pos[i] and float(c[i, j].detach()) > thr
        total = total + w * _ce(c / T, pos, excluded)
    return total


def _reference(q, p, ids, teacher, L, n):
    B = q.shape[0]
    loss = _variant(q, p, [b * n for b in range(B)], ids, L)
    if L.symmetric_weight:
        q_ids = None if ids is None else ids[::n]
        loss = loss + L.symmetric_weight * _variant(p[::n], q, list(range(B)), q_ids, L)
    if L.distill_weight:
        s = torch.stack([p[b * n:(b + 1) * n] @ q[b] for b in range(B)]) / T
        t = torch.softmax(teacher / L.distill_temperature, -1)
        loss = loss + L.distill_weight * (t * (t.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    return loss


TERMS = {
    "symmetric": dict(symmetric_weight=0.5),
    "matryoshka": dict(matryoshka_dims=[12, 6, 3], matryoshka_weights=[1.0, 0.5, 0.25]),
    "filter_margin": dict(false_negative_margin=0.6),
    "filter_delta": dict(false_negative_delta=0.1),
    "distill": dict(distill_weight=2.0, distill_temperature=0.5),
    "all": dict(symmetric_weight=0.3, matryoshka_dims=[12, 5], false_negative_margin=0.6, distill_weight=1.0),
}


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("term", list(TERMS))
def test_loss_terms_match_a_float64_reference(backend, term):
    g = torch.Generator().manual_seed(3)
    B, n, D = 5, 3, 12
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(B * n, D, generator=g, dtype=torch.float64), dim=-1)
    p[7] = p[0]  # a copy of query 0's positive in query 2's group
    q[4] = 0.8 * p[12] + 0.2 * q[4]  # a query close to its own positive, so the filters have work
    ids = torch.arange(B * n)
    ids[7] = ids[0]
    teacher = torch.randn(B, n, generator=g, dtype=torch.float64)
    L = Loss(**TERMS[term])
    qx, px = q.clone().requires_grad_(), p.clone().requires_grad_()
    objective = PooledObjective(T, L, backend=backend)
    got = objective.train_loss(qx, None, px, None, ids, ONE_RANK, teacher_scores=teacher)
    got.backward()
    qr, pr = q.clone().requires_grad_(), p.clone().requires_grad_()
    want = _reference(qr, pr, ids, teacher, L, n)
    want.backward()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(qx.grad, qr.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(px.grad, pr.grad, rtol=1e-6, atol=1e-8)
    plain = PooledObjective(T, backend=backend).train_loss(q, None, p, None, ids, ONE_RANK)
    assert not torch.allclose(got.detach().double(), plain.double()), "the term must change the loss"
    masked = objective.stats().get("fn_masked")
    if L.false_negative_margin is not None or L.false_negative_delta is not None:
        assert int(masked) > 0, "the filter must mask something here (else the test is vacuous)"
    else:
        assert masked is None


@pytest.mark.parametrize("loss", [{"symmetric_weight": 0.5}, {"matryoshka_dims": [8]}, {"false_negative_delta": 0.1}])
def test_colbert_refuses_the_pooled_loss_terms_naming_the_key(loss):
    from train_fixture import base_config

    from embedcore.errors import ConfigError
    from embedcore.train.config import config_from_dict

    data = base_config("model", "train.jsonl", None, "ckpt")
    data["loss"] = loss
    config_from_dict(data)  # fine for pooled models
    data["model"]["pooling"] = "colbert"
    with pytest.raises(ConfigError, match=f"loss.{next(iter(loss))}: the loss terms apply to pooled embeddings"):
        config_from_dict(data)
