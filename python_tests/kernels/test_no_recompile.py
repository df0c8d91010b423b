"""No recompiles mid-training: the per-step integers a Triton kernel takes (the stochastic
rounding keys derived from a step's seed) do not change the compiled kernel.

Triton specializes an integer argument on its value (equal to 1, divisible by 16, int32 or
int64 range): each new combination is a new compile, seconds of stall in a training step.
The kernels that take a seed's keys mark them ``do_not_specialize`` with an int64 type. Checked
here with Triton's own JIT cache key of each launch (the binder's specialization plus the
options, ``triton.runtime.jit.compute_cache_key``, what ``JITFunction.run`` looks compiled
kernels up by) for a CUDA target, on seeds whose keys fall in every class, in a process without
``TRITON_INTERPRET`` (the interpreter has no specialization)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels import adam as ka
from lowrank_kernels.kernels import projection as kp
from lowrank_kernels.kernels import quant as kq
from lowrank_kernels.reference.quant import seed_keys

backend = make_backend(GPUTarget("cuda", 90, 32))
E = lambda *s, dtype=torch.float32: torch.empty(s, dtype=dtype, device="meta")
b16 = torch.bfloat16


def keys(thunk):
    with L.capture() as caps:
        thunk()
    out = []
    for c in caps:
        meta = c.meta if c.tile_kernel is None else c.with_tile(c.tile_for(90))
        jf = c.kernel
        _, spec, opts = create_function_from_signature(jf.signature, jf.params, backend)(*c.args, **meta)
        out.append([jf.fn.__name__, compute_cache_key({}, spec, opts)])
    return out


def classes(k):
    return (k >= 2**31, k % 16 == 0, k == 1)


# seeds whose keys cover every class (int32 / int64 range, divisible by 16 or not)
seeds, seen = [], set()
for s in range(5000):
    c = tuple(classes(k) for k in seed_keys(s))
    if c not in seen:
        seen.add(c)
        seeds.append(s)
seeds += [0, 1, 2**31, 2**32 + 5, 2**63 - 1]

runs = {
    "project_adam": lambda s: kp._launch_project_adam(
        E(300, 200, dtype=b16), E(24, 200, dtype=b16), E(300, 24, dtype=b16), E(300, 24, dtype=b16), "right",
        0.9, 0.999, 1e-8, kp.moment_format("t", E(300, 24, dtype=b16), E(300, 24, dtype=b16), moment_seed=s)),
    "adam_update": lambda s: ka.adam_update_triton(E(300, 24, dtype=b16), E(300, 24, dtype=b16),
                                                   E(300, 24, dtype=b16), 0.9, 0.999, 1e-8, moment_seed=s),
    "int8_update_sr": lambda s: kq.quant_int8_update_sr_triton(
        E(300, 200, dtype=torch.uint8), E(469), E(469), E(300, 200), 1.0, -0.1, s, 128),
}
print(json.dumps({"classes": sorted(map(str, seen)),
                  "keys": {name: [keys(lambda: run(s)) for s in seeds] for name, run in runs.items()}}))
"""


def test_cache_key_does_not_change_with_the_seed():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["classes"]) >= 3  # keys in more than one specialization class were tried
    for name, per_seed in out["keys"].items():
        assert per_seed and all(len(k) >= 1 for k in per_seed), name
        first = per_seed[0]
        for k in per_seed[1:]:
            assert k == first, f"{name}: a new seed changes the compiled kernel's cache key"


_SHRINK_SCRIPT = r"""
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels import adam as ka
from lowrank_kernels.kernels import moments as km
from lowrank_kernels.kernels import projection_grouped as kg

backend = make_backend(GPUTarget("cuda", 90, 32))
E = lambda *s, dtype=torch.float32: torch.empty(s, dtype=dtype, device="meta")
b16 = torch.bfloat16
# the largest problem first (it sets the launch's tile) and every reduction length (n, the rank)
# a multiple of 64 (EVEN_K)
SHAPES = [(512, 768, 64), (256, 128, 64), (128, 256, 64), (320, 192, 64), (64, 64, 64), (192, 320, 64)]


def keys(thunk):
    with L.capture() as caps:
        thunk()
    out = []
    for c in caps:
        meta = c.meta if c.tile_kernel is None else c.with_tile(c.tile_for(90))
        jf = c.kernel
        _, spec, opts = create_function_from_signature(jf.signature, jf.params, backend)(*c.args, **meta)
        out.append([jf.fn.__name__, compute_cache_key({}, spec, opts)])
    return out


def projection(shapes, sr):
    k = len(shapes)
    ps = [E(m, n, dtype=b16) for m, n, _ in shapes]
    gs = [E(m, n, dtype=b16) for m, n, _ in shapes]
    pr = [E(r, n, dtype=b16) for _, n, r in shapes]
    ms = [E(m, r, dtype=b16) for m, _, r in shapes]
    vs = [E(m, r, dtype=b16) for m, _, r in shapes]
    kg.projection_foreach_project_update_backproject_triton(
        ps, gs, pr, ms, vs, "right", [1e-3] * k, 0.9, 0.999, 1e-8, [2] * k, [0.0] * k, [1.0] * k,
        moment_seed=[5 + i for i in range(k)] if sr else [], skip=E(k, dtype=torch.uint8), coeffs=E(k, 2))


def adam(shapes, q8):
    rs = [E(m, r) for m, _, r in shapes]
    if q8:
        ms = [E(m, r, dtype=torch.uint8) for m, _, r in shapes]
        vs = [E(m, r, dtype=torch.uint8) for m, _, r in shapes]
        ab = [E(m, -(-r // 64)) for m, _, r in shapes]
        ka.adam_foreach_update_triton(rs, ms, vs, [E(m, r) for m, _, r in shapes], 0.9, 0.999, 1e-8,
                                      ab, [E(*a.shape) for a in ab], 64, [])
    else:
        ms = [E(m, r) for m, _, r in shapes]
        vs = [E(m, r) for m, _, r in shapes]
        ka.adam_foreach_update_triton(rs, ms, vs, [E(m, r) for m, _, r in shapes], 0.9, 0.999, 1e-8,
                                      [], [], 0, [])


runs = {"project_grouped": lambda s: projection(s, False), "project_sr_grouped": lambda s: projection(s, True),
        "adam_grouped": lambda s: adam(s, False), "adam_q8_grouped": lambda s: adam(s, True)}
# the list, then smaller and smaller buckets (one problem dropped from the end each time, down to one)
print(json.dumps({name: [keys(lambda: run(SHAPES[:k])) for k in range(len(SHAPES), 0, -1)]
                  for name, run in runs.items()}))
"""


def test_a_shrinking_bucket_keeps_its_compiled_kernels():
    """A bucket that loses parameters on a refresh step (they take the refresh path) launches the
    grouped kernels on a shorter list: the same compiled kernels (Triton's cache key), as long as
    the launch's tile (its largest problem), alignment, unit strides and EVEN_K stay (the list
    length is not specialized on, the binary search's STEPS is rounded up:
    ``_launch.search_steps``). Lists of 6 problems down to 1."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _SHRINK_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name, per_size in out.items():
        assert per_size[0], name
        kernels = {k for k, _ in per_size[0]}
        assert any("grouped" in k for k in kernels), (name, kernels)
        for size, k in zip(range(len(per_size) - 1, 0, -1), per_size[1:]):
            assert k == per_size[0], f"{name}: a list of {size} problems compiles another kernel than one of 6"
