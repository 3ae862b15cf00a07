"""The trainer's objectives (embedcore.train.objective) on one rank: the training loss is the op
over the whole batch with query b's positive at b * n; the validation metrics are each query
against its own group only, checked against a float64 computation written here."""
import pytest
import torch
import torch.nn.functional as F

from embedcore.train.distributed import DistInfo
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
