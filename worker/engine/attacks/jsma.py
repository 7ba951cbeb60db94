"""JSMA: the Jacobian-based saliency map attack (Papernot, McDaniel, Jha, Fredrikson, Celik &
Swami, "The Limitations of Deep Learning in Adversarial Settings", IEEE EuroS&P 2016,
arXiv:1511.07528), the pair-of-features variant (the paper's Algorithm 3, as in cleverhans).

Targeted: each image gets a target class ``t != y``, by default drawn uniformly at random (the
cleverhans/ART default; ``target="next"`` uses ``(y + 1) mod K``). With ``s = sign(theta)`` and
the logit gradients ``g_t = dZ_t/dx`` and ``g_o = sum_{j != t} dZ_j/dx`` (both ``(N, n)``, ``n`` =
C*H*W features), every iteration picks, among features still in the search domain, the pair
``(p, q)`` that maximises ``alpha * |beta|`` with ``alpha = s*(g_t[p] + g_t[q]) > 0`` and
``beta = s*(g_o[p] + g_o[q]) < 0`` (formula 10 of the paper), adds ``theta`` to both (clipped to
[0, 1]) and removes them from the domain. The domain starts as the features that can still move
by more than 0.01 in the direction of ``theta`` (cleverhans: any amount; torchattacks: 0.01 as
here). On MNIST the saliency map otherwise spends pairs on pixels at 253/255 or 254/255, which
can only gain 1/255: on a LeNet that lowered the success rate from 0.57 to 0.47 (30 images).
An image stops when the model predicts ``t``, when no admissible
pair is left, or after ``floor(gamma * n / 2)`` pairs, so at most ``gamma * n`` features change.

Batched: the whole mini-batch advances together on its device, images drop out as they finish.
Only ``g_t`` and ``g_o`` are needed, never the full Jacobian: they are the gradients of
``sum_i Z_i,t_i`` and ``sum_i sum_{j != t_i} Z_i,j`` (images do not interact in eval mode), i.e.
two backward passes per iteration whatever the number of classes K (torchattacks' JSMA runs K
per image, ART's one per distinct target class in the batch).

The pair search is exact but not quadratic in ``n`` in the usual case: the best pair is first
sought among the top-k features (k = 8 first) by ``s*g_t`` and by ``-s*g_o``; a pair with a
member p outside that candidate set has ``s*g_t[p] <= a_k`` and ``-s*g_o[p] <= c_k`` (the k-th largest values), so
its score is at most ``max_q (a_k + a_q)(c_k + c_q)``, a bound computed in O(n). Where the bound
does not beat the candidate optimum, the answer is exact; elsewhere k grows (8, 32, 128, ...,
then all n features, in image chunks that bound memory). The worst case stays quadratic in n,
as in the paper. On MNIST (LeNet, 500 images) 40 % of the searches end at k = 8, 56 % at k = 32,
4 % at k = 128, none needs all 784 features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, AttackParamError, check_choice, check_float, check_int

TARGETS = ("random", "next")
_MIN_MOVE = 0.01  # a feature enters the search domain only if it can change by more than this
_K_START = 8  # candidates per list in the first round; each further round takes 4x more
_PAIR_ELEMS = 1 << 22  # pair-matrix elements per chunk in the exhaustive search (16 MiB per float tensor)


class JSMA(Attack):
    """Targeted L0 attack. ``x``: (N, C, H, W) in [0, 1], ``y``: (N,) -> ``x_adv`` (N, C, H, W)
    differing from ``x`` in at most ``floor(gamma * C*H*W / 2) * 2`` features.

    ``theta``: change applied to a chosen feature (+1: set to white; negative: darken);
    ``gamma``: maximum fraction of features changed; ``target``: "random" (uniform over the other
    classes, drawn with ``seed``) or "next" (``(y + 1) mod K``).
    """

    name = "jsma"

    def __init__(self, model: nn.Module, theta: float = 1.0, gamma: float = 0.1, target: str = "random",
                 seed: int = 0, *, batch_size: int = 250) -> None:
        super().__init__(model, batch_size=batch_size)
        self.theta = check_float("theta", theta, -1.0, 1.0)
        if self.theta == 0:
            raise AttackParamError("theta", "theta must be non-zero (it is the change applied to a feature), got 0")
        self.gamma = check_float("gamma", gamma, 0.0, 1.0, lo_open=True)
        self.target = check_choice("target", target, TARGETS)
        self.seed = check_int("seed", seed, lo=0)

    def params(self) -> dict:
        return {"theta": self.theta, "gamma": self.gamma, "target": self.target, "seed": self.seed}

    def targets(self, y: Tensor, num_classes: int) -> Tensor:
        """The target class of each label in ``y`` (N,), always ``!= y``, on ``y``'s device."""
        if num_classes < 2:
            raise ValueError(f"JSMA needs at least 2 classes, the model has {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if self.target == "next":
            return (y + 1) % num_classes
        g = torch.Generator().manual_seed(self.seed)
        shift = torch.randint(1, num_classes, (y.shape[0],), generator=g).to(y.device)
        return (y + shift) % num_classes

    def _per_sample(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        # The first mini-batch, not x[:1]: an exported model may not accept a batch of one.
        with torch.no_grad():
            num_classes = self.model(x[:self.batch_size]).shape[1]
        return (self.targets(y, num_classes),)

    def _run(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        n_img, shape = x.shape[0], x.shape[1:]
        nf = shape.numel()
        max_pairs = int(nf * self.gamma) // 2
        s = 1.0 if self.theta > 0 else -1.0
        xf = x.reshape(n_img, nf).clone()
        domain = xf < 1 - _MIN_MOVE if s > 0 else xf > _MIN_MOVE
        active = torch.arange(n_img, device=x.device)
        for _ in range(max_pairs):
            if active.numel() == 0:
                break
            xa = xf[active].requires_grad_(True)
            logits = self.model(xa.view(-1, *shape))
            ta = t[active]
            g_t, g_o = self._grads(logits, xa, ta)
            go = logits.detach().argmax(1) != ta
            a = s * g_t[go]
            c = -s * g_o[go]
            idx = active[go]
            p, q, found = best_pairs(a, c, domain[idx])
            idx, p, q = idx[found], p[found], q[found]
            for f in (p, q):
                xf[idx, f] = (xf[idx, f] + self.theta).clamp(0.0, 1.0)
                domain[idx, f] = False
            active = idx
        return xf.view_as(x)

    @staticmethod
    def _grads(logits: Tensor, xa: Tensor, ta: Tensor) -> tuple[Tensor, Tensor]:
        """``dZ_t/dx`` and ``d(sum_{j != t} Z_j)/dx``, both (B, n): two vector-Jacobian products.
        (One vmapped backward with ``is_grads_batched`` measured slower on a CPU LeNet.)"""
        onehot = nn.functional.one_hot(ta, logits.shape[1]).to(logits.dtype)
        g_t = torch.autograd.grad(logits, xa, onehot, retain_graph=True)[0]
        return g_t, torch.autograd.grad(logits, xa, 1 - onehot)[0]


@torch.no_grad()
def best_pairs(a: Tensor, c: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the pair ``p != q`` of valid features maximising ``(a_p + a_q) * (c_p + c_q)``
    subject to both sums > 0 (JSMA's saliency map, written with ``a = s*g_t`` and ``c = -s*g_o``).

    ``a``, ``c``: float (m, n); ``valid``: bool (m, n). Returns ``p``, ``q`` (m,) int64 and
    ``found`` (m,) bool (False where no admissible pair exists; p and q are then 0). Exact: see
    the module docstring for the pruning bound.
    """
    m, nf = a.shape
    if nf < 2:
        z = torch.zeros(m, dtype=torch.long, device=a.device)
        return z, z.clone(), torch.zeros(m, dtype=torch.bool, device=a.device)
    # Excluded features get -inf: every sum with them is <= 0 and clamps to a score of 0.
    a = a.masked_fill(~valid, float("-inf"))
    c = c.masked_fill(~valid, float("-inf"))
    p = torch.zeros(m, dtype=torch.long, device=a.device)
    q = torch.zeros_like(p)
    score = torch.zeros(m, dtype=a.dtype, device=a.device)
    todo = None  # rows still to solve; None = all
    k = _K_START
    while 2 * k < nf:
        ra, rc = (a, c) if todo is None else (a[todo], c[todo])
        ta, ia = ra.topk(k, dim=1)
        tc, ic = rc.topk(k, dim=1)
        # A feature in both top-k lists is kept once: its copy in the second list is excluded.
        dup = (ic[:, :, None] == ia[:, None, :]).any(2)
        cand = torch.cat([ia, ic], 1)
        ca, cc = ra.gather(1, cand), rc.gather(1, cand)
        ca[:, k:].masked_fill_(dup, float("-inf"))
        sc, pp, qq = _pair_search(ca, cc, cand)
        # Best possible score of a pair with a member outside the candidates (module docstring).
        bound = ((ta[:, -1:] + ra).clamp_(min=0) * (tc[:, -1:] + rc).clamp_(min=0)).amax(1)
        exact = bound <= sc
        rows = torch.arange(m, device=a.device) if todo is None else todo
        done = rows[exact]
        score[done], p[done], q[done] = sc[exact], pp[exact], qq[exact]
        todo = rows[~exact]
        if todo.numel() == 0:
            break
        k *= 4
    if todo is None:
        todo = torch.arange(m, device=a.device)
    if todo.numel():
        cand_all = torch.arange(nf, device=a.device)
        chunk = max(1, _PAIR_ELEMS // (nf * (nf - 1) // 2))
        for s in range(0, todo.numel(), chunk):
            rows = todo[s:s + chunk]
            sc, pp, qq = _pair_search(a[rows], c[rows], cand_all.expand(rows.numel(), nf))
            score[rows], p[rows], q[rows] = sc, pp, qq
    return p, q, score > 0


def _pair_search(a: Tensor, c: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exhaustive search over the pairs ``i < j`` of the M candidates per row. ``a``, ``c``,
    ``idx``: (r, M), ``idx`` holding distinct feature indices (excluded candidates carry -inf in
    ``a``). Returns the best score (r,) (0 where no pair is admissible) and the feature indices
    p, q (r,)."""
    mm = a.shape[1]
    i, j = _upper_pairs(mm, a.device)
    score = (a.index_select(1, i) + a.index_select(1, j)).clamp_(min=0)
    score.mul_((c.index_select(1, i) + c.index_select(1, j)).clamp_(min=0))
    best, flat = score.max(1)
    return best, idx.gather(1, i[flat][:, None]).squeeze(1), idx.gather(1, j[flat][:, None]).squeeze(1)


_PAIRS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _upper_pairs(mm: int, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (mm, device)
    if key not in _PAIRS:
        iu = torch.triu_indices(mm, mm, 1, device=device)
        _PAIRS[key] = (iu[0], iu[1])
    return _PAIRS[key]
