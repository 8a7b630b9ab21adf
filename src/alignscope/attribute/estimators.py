"""Estimators: how much did each training pair move the measurement? Gradients in, scores out.

**Sign convention (one, everywhere):** a positive score means that up-weighting this training pair
moves the measured metric in the direction the probe calls *worse* (measurements are oriented so
that higher = worse). One SGD step of size η on pair i changes f by ``−η ∇f·∇L_i``, so

    gradsim_dot    = −∇f·∇L_i
    gradsim_cosine = −∇f·∇L_i / (‖∇f‖ ‖∇L_i‖)        (same sign as the dot)
    gradsim_layer_cosine = mean_l −∇f_l·∇L_i,l / (‖∇f_l‖ ‖∇L_i,l‖)   (l: each LoRA weight)
    margin         = +∇f·∇margin_i                   (= gradsim_dot / (per-pair loss weight))
    datainf        = −∇fᵀ H⁻¹ ∇L_i                   (H: per-layer damped Gauss–Newton, DataInf)
    ekfac_onepass  = −∇fᵀ H⁻¹ ∇L_i                   (H: per-layer EK-FAC, fitted on the one collection pass)
    tracin         = Σ_k η_k · (−∇f_k·∇L_i,k)        (over saved checkpoints k)
    self_influence = ‖∇L_i‖²                         (no direction: large = outlier / hard / duplicate)

``margin`` matters: DPO's gradient is ``−σ(−m_i) ∇m_i``; a pair the stage already fits has
σ(−m_i) ≈ 0, so the raw dot ranks exactly the pairs that did the most work *last*. Dividing the
weight out (the gradient of the margin) keeps them visible.

All estimators work on the side decomposition ``∇L_i = Σ_side a_i,side ∇s_i,side`` (see
``objective.py``), so the chosen-side and rejected-side parts of every linear score come with it.
Everything streams over the stored gradients in row chunks; ``test`` may hold many measurement
vectors (rows), giving an (n_train × n_test) score matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from alignscope.errors import InputError

ESTIMATORS = ("gradsim_dot", "gradsim_cosine", "gradsim_layer_cosine", "margin", "datainf", "ekfac_onepass",
              "self_influence", "tracin", "ekfac", "kfac")
SIGN_CONVENTION = ("positive score = up-weighting this training pair moves the metric in the direction the probe "
                   "calls worse (higher); negative = it moves the metric towards better")
CHUNK_ROWS = 512
DATAINF_DAMPING = 0.1
EKFAC_DAMPING = 0.1  # × the layer's mean eigenvalue: kronfluence's default heuristic


class Gradients(Protocol):
    """What the estimators read: per-side gradient rows, per-pair coefficients, layer slices."""

    sides: tuple[str, ...]

    @property
    def layers(self) -> Sequence[Any]: ...

    def side(self, name: str) -> np.ndarray: ...

    def coef(self, kind: str, side: str) -> np.ndarray: ...


@dataclass
class ArrayGradients:
    """In-memory gradients (tests, benchmarks): ``loss`` rows only, coefficient −1 (∇L = −∇s)."""

    arrays: dict[str, np.ndarray]
    coefs: dict[str, dict[str, np.ndarray]]
    layer_slices: list[tuple[int, int]]

    @property
    def sides(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.arrays)

    @property
    def layers(self) -> list[Any]:
        return [_Slice(a, b - a) for a, b in self.layer_slices]

    def side(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def coef(self, kind: str, side: str) -> np.ndarray:
        return self.coefs[kind][side]

    @classmethod
    def from_loss_gradients(cls, grads: np.ndarray, layer_slices: list[tuple[int, int]] | None = None
                            ) -> ArrayGradients:
        """Wrap plain per-example loss gradients (margin = −loss direction, weight 1)."""
        n = grads.shape[0]
        slices = layer_slices or [(0, grads.shape[1])]
        return cls({"chosen": grads}, {"loss": {"chosen": np.ones(n)}, "margin": {"chosen": -np.ones(n)}}, slices)


@dataclass
class _Slice:
    offset: int
    size: int


CHUNK_BYTES = 1 << 27  # float64 working set per streamed chunk (128 MiB)


def _n(train: Gradients) -> int:
    return int(train.side(train.sides[0]).shape[0])


def _chunks(n: int, dim: int | None = None) -> list[slice]:
    """Row slices small enough that a float64 chunk of ``dim`` columns stays near CHUNK_BYTES."""
    size = CHUNK_ROWS if dim is None else max(1, min(CHUNK_ROWS, CHUNK_BYTES // (8 * max(dim, 1))))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _dim(train: Gradients) -> int:
    return int(train.side(train.sides[0]).shape[1])


def _as_matrix(test: np.ndarray) -> np.ndarray:
    test = np.asarray(test, dtype=np.float64)
    return test[None, :] if test.ndim == 1 else test


def loss_rows(train: Gradients, rows: slice, kind: str = "loss") -> np.ndarray:
    """Per-pair ∇loss (or ∇margin) for a row slice, from the side gradients."""
    out = None
    for side in train.sides:
        part = np.asarray(train.side(side)[rows], dtype=np.float64) * train.coef(kind, side)[rows, None]
        out = part if out is None else out + part
    assert out is not None
    return out


def side_products(train: Gradients, test: np.ndarray) -> dict[str, np.ndarray]:
    """``∇s_side · u`` for every pair and test row: side → (n_train × n_test)."""
    u = _as_matrix(test)
    n = _n(train)
    out = {side: np.zeros((n, u.shape[0])) for side in train.sides}
    for rows in _chunks(n, _dim(train)):
        for side in train.sides:
            out[side][rows] = np.asarray(train.side(side)[rows], dtype=np.float64) @ u.T
    return out


def _combine(train: Gradients, products: dict[str, np.ndarray], kind: str, sign: float
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    parts = {side: sign * train.coef(kind, side)[:, None] * products[side] for side in train.sides}
    return sum(parts.values()), parts  # type: ignore[return-value]


@dataclass
class Scores:
    """An estimator's (n_train × n_test) scores and, for linear ones, the per-side parts."""

    total: np.ndarray
    sides: dict[str, np.ndarray]


def gradsim_dot(train: Gradients, test: np.ndarray, products: dict[str, np.ndarray] | None = None) -> Scores:
    """−∇f·∇L_i: the first-order change of f from one SGD step on pair i (per unit step)."""
    total, parts = _combine(train, products or side_products(train, test), "loss", -1.0)
    return Scores(total, parts)


def loss_norms(train: Gradients, kind: str = "loss") -> np.ndarray:
    n = _n(train)
    out = np.zeros(n)
    for rows in _chunks(n, _dim(train)):
        out[rows] = np.linalg.norm(loss_rows(train, rows, kind), axis=1)
    return out


def gradsim_cosine(train: Gradients, test: np.ndarray, products: dict[str, np.ndarray] | None = None,
                   norms: np.ndarray | None = None) -> Scores:
    """The dot with both gradients normalised: which pairs point where the metric gets worse,
    regardless of how large their (possibly already fitted, hence tiny) gradient is."""
    dot = gradsim_dot(train, test, products)
    norms = loss_norms(train) if norms is None else norms
    test_norm = np.linalg.norm(_as_matrix(test), axis=1)
    scale = 1.0 / np.maximum(norms[:, None] * test_norm[None, :], 1e-30)
    return Scores(dot.total * scale, {k: v * scale for k, v in dot.sides.items()})


def gradsim_layer_cosine(train: Gradients, test: np.ndarray) -> Scores:
    """The cosine taken per LoRA weight and averaged: every weight matrix gets one vote.

    Why: gradient norms differ a lot between weights. On the default study's stage (210 LoRA
    weights in the later half of the blocks) a pair's per-weight norms span a factor of 30, and a
    tenth of the weights, mostly the last block's MLP, hold half of its squared norm (two thirds of
    ∇f's). The whole-vector cosine is decided by those few weights. Averaging each weight's own
    cosine lets every weight's direction count; it ranked the planted pairs better on six of six
    seeds (BENCHMARKS.md, session 9). A weight where either gradient is zero contributes 0. With one
    weight it is the cosine.
    """
    u = _as_matrix(test)
    n = _n(train)
    layers = [slice(layer.offset, layer.offset + layer.size) for layer in train.layers]
    test_norms = [np.linalg.norm(u[:, part], axis=1) for part in layers]
    sides = {side: np.zeros((n, u.shape[0])) for side in train.sides}
    for rows in _chunks(n, 3 * _dim(train)):  # the loss rows and both sides' rows are held at once
        raw = {side: np.asarray(train.side(side)[rows], dtype=np.float64) for side in train.sides}
        coefs = {side: train.coef("loss", side)[rows, None] for side in train.sides}  # once per chunk, not per weight
        loss = sum(raw[side] * coefs[side] for side in train.sides)  # as loss_rows, without reading the sides again
        for part, test_norm in zip(layers, test_norms):
            scale = 1.0 / np.maximum(np.linalg.norm(loss[:, part], axis=1)[:, None] * test_norm[None, :], 1e-30)
            for side in train.sides:
                sides[side][rows] -= coefs[side] * (raw[side][:, part] @ u[:, part].T) * scale
    sides = {side: value / max(len(layers), 1) for side, value in sides.items()}
    return Scores(sum(sides.values()), sides)  # type: ignore[arg-type]


def margin(train: Gradients, test: np.ndarray, products: dict[str, np.ndarray] | None = None) -> Scores:
    """+∇f·∇margin_i: the loss gradient with the per-pair loss weight divided out."""
    total, parts = _combine(train, products or side_products(train, test), "margin", 1.0)
    return Scores(total, parts)


def self_influence(train: Gradients) -> np.ndarray:
    """‖∇L_i‖²: large for outliers, mislabelled or duplicated-but-conflicting pairs."""
    return loss_norms(train) ** 2


def datainf_direction(train: Gradients, test: np.ndarray, damping: float = DATAINF_DAMPING) -> np.ndarray:
    """H⁻¹∇f per layer with DataInf's closed form (Kwon et al. 2024, eq. 5).

    Per layer l, with per-example loss gradients g_jl and damping λ_l = ``damping`` × mean_j ‖g_jl‖²:

        (1/n Σ_j g_jl g_jlᵀ + λ_l I)⁻¹ ≈ 1/(n λ_l) Σ_j (I − g_jl g_jlᵀ / (λ_l + ‖g_jl‖²))

    (the average of Sherman–Morrison inverses). Applied to v_l it is (n v_l − r_l) / (n λ_l) with
    r_l = Σ_j c_j g_jl, c_j = (v_l·g_jl) / (λ_l + ‖g_jl‖²): two streaming passes, no n×n matrix.
    """
    v = _as_matrix(test)
    n = _n(train)
    layers = list(train.layers)
    sq = np.zeros((n, len(layers)))
    for rows in _chunks(n, _dim(train)):
        g = loss_rows(train, rows)
        for k, layer in enumerate(layers):
            sq[rows, k] = np.square(g[:, layer.offset:layer.offset + layer.size]).sum(axis=1)
    lam = damping * sq.mean(axis=0)
    lam = np.where(lam > 0, lam, 1e-12)
    r = np.zeros_like(v)
    for rows in _chunks(n, _dim(train)):
        g = loss_rows(train, rows)
        for k, layer in enumerate(layers):
            part = slice(layer.offset, layer.offset + layer.size)
            c = (g[:, part] @ v[:, part].T) / (lam[k] + sq[rows, k])[:, None]  # (rows × tests)
            r[:, part] += c.T @ g[:, part]
    out = np.empty_like(v)
    for k, layer in enumerate(layers):
        part = slice(layer.offset, layer.offset + layer.size)
        out[:, part] = (n * v[:, part] - r[:, part]) / (n * lam[k])  # Σ_j I = n·I
    return out


def datainf(train: Gradients, test: np.ndarray, damping: float = DATAINF_DAMPING) -> Scores:
    """−∇fᵀ H⁻¹ ∇L_i with DataInf's per-layer inverse (see :func:`datainf_direction`)."""
    direction = datainf_direction(train, test, damping)
    total, parts = _combine(train, side_products(train, direction), "loss", -1.0)
    return Scores(total, parts)


def ekfac_direction(train: Any, test: np.ndarray, damping: float = EKFAC_DAMPING) -> np.ndarray:
    """H⁻¹∇f per layer with EK-FAC (George et al. 2018; Grosse et al. 2023), one pass over the data.

    Per layer, the eigenbases Q_S, Q_A of the K-FAC sums S = Σ g gᵀ and A = Σ x xᵀ (accumulated by
    the collection hooks) rotate a gradient matrix G to Q_Sᵀ G Q_A; the eigenvalues are then fitted
    in that basis on the stored per-pair loss gradients, Λ = mean_i (Q_Sᵀ G_i Q_A)² (the eigenvalue
    correction), and H⁻¹v = Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ with λ = ``damping`` × mean(Λ). kronfluence
    needs a pass for the factors, one for Λ and one for the scores; here the factors ride along with
    gradient collection and Λ and the scores read the stored gradients.
    """
    factors = train.factors() if callable(getattr(train, "factors", None)) else None
    if factors is None:
        raise InputError("ekfac_onepass needs K-FAC factors collected with the gradients; attribute with "
                         "--method ekfac_onepass so the collection keeps them")
    v = _as_matrix(test)
    n = _n(train)
    layers = list(train.layers)
    bases = [(np.linalg.eigh(s)[1], np.linalg.eigh(a)[1]) for a, s in factors]
    lam = [np.zeros(layer.proj) for layer in layers]
    for rows in _chunks(n, _dim(train)):
        g = loss_rows(train, rows)
        for k, layer in enumerate(layers):
            qs, qa = bases[k]
            rotated = qs.T @ g[:, layer.offset:layer.offset + layer.size].reshape(-1, *layer.proj) @ qa
            lam[k] += np.square(rotated).sum(axis=0)
    out = np.zeros_like(v)
    for k, layer in enumerate(layers):
        eig = lam[k] / n
        floor = damping * eig.mean()
        if floor <= 0:  # a layer with no gradient (e.g. LoRA A while B is still zero) has no influence
            continue
        qs, qa = bases[k]
        part = slice(layer.offset, layer.offset + layer.size)
        rotated = qs.T @ v[:, part].reshape(-1, *layer.proj) @ qa
        out[:, part] = (qs @ (rotated / (eig + floor)) @ qa.T).reshape(len(v), -1)
    return out


def ekfac_onepass(train: Any, test: np.ndarray, damping: float = EKFAC_DAMPING) -> Scores:
    """−∇fᵀ H⁻¹ ∇L_i with the one-pass EK-FAC inverse (see :func:`ekfac_direction`)."""
    total, parts = _combine(train, side_products(train, ekfac_direction(train, test, damping)), "loss", -1.0)
    return Scores(total, parts)


def tracin(checkpoints: Sequence[tuple[float, Gradients, np.ndarray]]) -> Scores:
    """Σ_k η_k (−∇f_k·∇L_i,k) over checkpoints given as (learning rate, train grads, ∇f)."""
    if not checkpoints:
        raise InputError("tracin needs saved checkpoints, and this stage kept none; retrain the stage with "
                         "checkpoints kept, or use --method gradsim / datainf")
    total = None
    sides: dict[str, np.ndarray] = {}
    for lr, train, test in checkpoints:
        s = gradsim_dot(train, test)
        total = lr * s.total if total is None else total + lr * s.total
        for k, v in s.sides.items():
            sides[k] = sides.get(k, 0) + lr * v
    assert total is not None
    return Scores(total, sides)


# --------------------------------------------------------------------------- validation metrics


def planted_auc(scores: np.ndarray, planted: np.ndarray) -> float | None:
    """Probability that a random planted pair outscores a random clean one (ties count half)."""
    planted = np.asarray(planted, dtype=bool)
    pos, neg = scores[planted], scores[~planted]
    if len(pos) == 0 or len(neg) == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def recall_at_k(scores: np.ndarray, planted: np.ndarray, k: int | None = None) -> float | None:
    """Share of planted pairs among the top k (k = number of planted pairs by default)."""
    planted = np.asarray(planted, dtype=bool)
    k = int(planted.sum()) if k is None else k
    if k == 0 or planted.sum() == 0:
        return None
    top = np.argsort(-scores, kind="stable")[:k]
    return float(planted[top].sum() / planted.sum())
