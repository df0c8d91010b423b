"""How a GaLore-family refresh picks its subspace: ``refresh="svd" | "sample" | "random"``.

- ``"svd"`` (default): the top ``r`` singular vectors of the gradient (GaLore).
- ``"sample"`` (SARA / I3S, "importance sampling for low-rank optimization", NeurIPS 2025;
  the rule of ``pkumelon/Golore``'s ``I3S_projector.py``): after the SVD, ``r`` singular
  vectors are drawn *without replacement* with probability proportional to their singular
  values (``torch.multinomial(s, r)``), then kept in singular-value order (ascending index,
  as the reference's ``.sort()``). When fewer than ``r`` singular values are positive, all
  positive ones are taken and the rest of the ``r`` are the next ones in order (a
  multinomial without replacement cannot draw zero-probability entries).
- ``"random"`` (GoLore, "Subspace optimization for large language models with convergence
  guarantees", ICML 2025): at refreshes of steps ``t > random_after`` the projector is
  drawn uniformly from the Stiefel manifold, independently of the gradient: ``Q`` of the QR
  decomposition of a Gaussian matrix with the signs of ``diag(R)`` folded in (the
  Haar-uniform draw; GoLore's code orthonormalizes a Gaussian matrix by its polar factor,
  the same distribution). Refreshes at steps ``t <= random_after`` take the SVD. No SVD is
  computed for a random refresh.

Every draw uses its own CPU generator seeded with ``mix_seed(refresh_seed, step, index)``
(``index``: the parameter's 1-based position in the optimizer), never the global RNG, so
every rank of a distributed run, a resumed run and two optimizers built alike draw the same
projector. The draws happen on the CPU (the sampling reads ``r``-many singular values; a
random projector is an ``n x r`` Gaussian and its QR) and the result moves to the device,
so they do not depend on the device type either.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .common import mix_seed

#: values of the ``refresh`` group key.
REFRESH_MODES = ("svd", "sample", "random")
#: tags that keep the sampling and the random-projector streams apart.
_SAMPLE_TAG = 0x5A4A
_RANDOM_TAG = 0x601E


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(group: Mapping[str, Any], err: Callable[[str], str]) -> None:
    """Check ``refresh`` (one of :data:`REFRESH_MODES`), ``random_after`` (an int >= 0) and
    ``refresh_seed`` (an int) of a param group; missing keys take their defaults."""
    mode = group.get("refresh", "svd")
    if mode not in REFRESH_MODES:
        raise ValueError(err(f"refresh must be one of {', '.join(map(repr, REFRESH_MODES))}, got {mode!r}"))
    after = group.get("random_after", 0)
    if not _is_int(after) or after < 0:
        raise ValueError(err(f"random_after must be an int >= 0 (the last step whose refresh takes the SVD), "
                             f"got {after!r}"))
    seed = group.get("refresh_seed", 0)
    if not _is_int(seed):
        raise ValueError(err(f"refresh_seed must be an int, got {seed!r}"))


def is_random(group: Mapping[str, Any], step: int) -> bool:
    """Whether the refresh at ``step`` (1-based) draws a random projector (GoLore)."""
    return group.get("refresh", "svd") == "random" and step > int(group.get("random_after", 0))


def generator(group: Mapping[str, Any], step: int, index: int, tag: int) -> torch.Generator:
    """A CPU generator seeded from ``refresh_seed``, the step and the parameter's index."""
    gen = torch.Generator()
    gen.manual_seed(mix_seed(int(group.get("refresh_seed", 0)), step, index, tag))
    return gen


def sample_indices(s: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """``r`` distinct indices into the singular values ``s`` (descending), drawn without
    replacement with probability proportional to ``s``, in ascending order (int64, CPU).

    With fewer than ``r`` positive values the positive ones are all taken and the first
    non-positive ones complete the set (deterministic)."""
    w = s.detach().to("cpu", torch.float64).clamp(min=0)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("sample_indices: the singular values are not finite")
    k = int((w > 0).sum())
    if k <= r:
        return torch.arange(r, dtype=torch.int64)
    return torch.multinomial(w, r, replacement=False, generator=gen).sort().values


def sampling_seed_generator(group, step: int, index: int) -> torch.Generator:
    """The generator of SARA's draw at ``step`` for the parameter at ``index``."""
    return generator(group, step, index, _SAMPLE_TAG)


def random_orthonormal(rows: int, cols: int, gen: torch.Generator, *, dtype=torch.float32) -> torch.Tensor:
    """A ``rows x cols`` (``rows >= cols``) matrix with orthonormal columns, Haar-uniform on
    the Stiefel manifold: ``Q`` of ``QR(Z)`` with ``Z`` standard Gaussian (drawn from
    ``gen`` on the CPU, in float64), each column multiplied by the sign of ``R``'s diagonal."""
    if rows < cols:
        raise ValueError(f"random_orthonormal: need rows >= cols, got {rows} x {cols}")
    z = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    q, rr = torch.linalg.qr(z)
    d = torch.sign(torch.diagonal(rr))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return (q * d).to(dtype)


def random_projector(shape, r: int, side: str, group, step: int, index: int, *, device, dtype=torch.float32):
    """GoLore's projector for an ``m x n`` weight: right ``r x n`` (orthonormal rows), left
    ``m x r`` (orthonormal columns), full the pair ``(m x r, r x n)``; float ``dtype`` on
    ``device``."""
    m, n = shape
    gen = generator(group, step, index, _RANDOM_TAG)
    left = random_orthonormal(m, r, gen) if side in ("left", "full") else None
    right = random_orthonormal(n, r, gen).T if side in ("right", "full") else None
    out = tuple(t.to(device=device, dtype=dtype).contiguous() for t in (left, right) if t is not None)
    return out if side == "full" else out[0]


__all__ = ["REFRESH_MODES", "validate", "is_random", "generator", "sample_indices", "sampling_seed_generator",
           "random_orthonormal", "random_projector"]
