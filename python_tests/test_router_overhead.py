"""The router's fast paths keep the behaviour of the checks they speed up.

The validators run in every op call, so ``_checks`` answers plain ``bool`` conditions
without ``torch._check_*``, formats messages only on failure, computes each tensor's
memory span once, and the registry caches what cannot change. These tests pin the
behaviour (never the timing): same errors, symbolic conditions still handled, the
overlap check as strict as before, run-time backend changes still honoured.
"""
import os
import threading

import numpy as np
import pytest
import torch

import lowrank_kernels
from lowrank_kernels.ops import _checks as C
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import projection as P


def test_fail_value_and_type_plain_bools():
    C.fail_value(True, "op", lambda: pytest.fail("message formatted on success"))
    C.fail_type(True, "op", lambda: pytest.fail("message formatted on success"))
    with pytest.raises(ValueError, match=r"^op: bad 3$"):
        C.fail_value(False, "op", lambda: f"bad {3}")
    with pytest.raises(ValueError, match=r"^op: plain$"):
        C.fail_value(False, "op", "plain")
    with pytest.raises(TypeError, match=r"^op: wrong$"):
        C.fail_type(False, "op", "wrong")
    # A condition that is not a bool still goes to torch._check_value and its TypeError.
    with pytest.raises(TypeError, match="cond must be a bool"):
        C.fail_value(torch.tensor(True), "op", "x")
    with pytest.raises(ValueError, match=r"^op: x must have shape \(3, 2\) \(why 2\), got \(2, 3\)$"):
        C.check_shape(torch.zeros(2, 3), "x", "op", (3, 2), lambda: "why 2")


def _adam_args(m=8, n=6, r=2):
    return torch.randn(m, n), torch.randn(r, n), torch.zeros(m, r), torch.zeros(m, r)


def test_overlap_detected_within_one_storage():
    g, p, ea, es = _adam_args()
    base = torch.zeros(2 * 8 * 2 + 3)
    ea2 = base[:16].view(8, 2)
    es2 = base[15:31].view(8, 2)  # one element shared with ea2
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        P.validate_project_adam(g, p, ea2, es2, "right", 0.9, 0.999, 1e-8)
    es3 = base[16:32].view(8, 2)  # adjacent, disjoint
    P.validate_project_adam(g, p, ea2, es3, "right", 0.9, 0.999, 1e-8)
    # A strided view whose span reaches into the other tensor counts (span, not elements).
    wide = torch.zeros(8, 6)
    with pytest.raises(ValueError, match="exp_avg and grad share memory"):
        P.validate_project_adam(wide, p, wide[:, 4:], es, "right", 0.9, 0.999, 1e-8)


def test_overlap_detected_across_distinct_storages():
    # Two numpy views of one buffer become two torch storages over the same memory:
    # comparing storages alone would miss this; the span check does not.
    buf = np.zeros(40, dtype=np.float32)
    ea = torch.from_numpy(buf[:16]).view(8, 2)
    es = torch.from_numpy(buf[10:26]).view(8, 2)
    assert ea.untyped_storage().data_ptr() != es.untyped_storage().data_ptr()
    g, p, _, _ = _adam_args()
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        P.validate_project_adam(g, p, ea, es, "right", 0.9, 0.999, 1e-8)


def test_fused_validator_reports_first_overlap_in_order():
    g, p, ea, es = _adam_args()
    param = torch.randn(8, 6)
    # param aliases grad and exp_avg aliases proj: the inner (project_adam) check runs
    # first, so the exp_avg pair is reported, as before the span cache.
    ea_alias = p.reshape(-1)[:2].expand(8, 2)
    with pytest.raises(ValueError, match="exp_avg and proj share memory"):
        P.validate_project_update_backproject(
            g, g, p, ea_alias, es, "right", 1e-3, 0.9, 0.999, 1e-8, 1, 0.0, 1.0
        )
    with pytest.raises(ValueError, match="param and grad share memory"):
        P.validate_project_update_backproject(g, g, p, ea, es, "right", 1e-3, 0.9, 0.999, 1e-8, 1, 0.0, 1.0)
    P.validate_project_update_backproject(param, g, p, ea, es, "right", 1e-3, 0.9, 0.999, 1e-8, 1, 0.0, 1.0)


def test_meta_and_empty_tensors_never_overlap():
    m = torch.empty(4, device="meta")
    e = torch.empty(0)
    C.check_no_overlap("op", [("a", m), ("b", e)], [("c", m), ("d", e)])


def test_compile_dynamic_shapes_runs_symbolic_checks():
    # dynamic=True makes the sizes SymInts inside the fake impl, so shape conditions
    # are SymBools there and take the torch._check_value path.
    def f(g, p, ea, es):
        return P.project_adam_op(g, p, ea, es, "right", 0.9, 0.999, 1e-8)

    cf = torch.compile(f, dynamic=True, fullgraph=True, backend="eager")
    for m, n, r in ((8, 6, 2), (11, 7, 3)):
        g, p, ea, es = _adam_args(m, n, r)
        ea_ref, es_ref = ea.clone(), es.clone()
        out = cf(g, p, ea, es)
        ref = f(g, p, ea_ref, es_ref)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(ea, ea_ref)


def test_backend_choice_follows_runtime_changes(monkeypatch):
    op = reg.OPS["projection_project_adam"]
    cpu = torch.device("cpu")
    g, p, ea, es = _adam_args()
    monkeypatch.delenv(reg.ENV_VAR, raising=False)
    auto = reg.resolve_backend(op, cpu)
    assert auto == ("cpp" if reg.extension_loaded() else "reference")
    monkeypatch.setenv(reg.ENV_VAR, "reference")
    assert reg.resolve_backend(op, cpu) == "reference"
    monkeypatch.setenv(reg.ENV_VAR, " reference ")
    assert reg.resolve_backend(op, cpu) == "reference"
    monkeypatch.setenv(reg.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(reg.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        reg.resolve_backend(op, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert reg.resolve_backend(op, cpu) == "triton"
    monkeypatch.delenv(reg.ENV_VAR)
    assert reg.resolve_backend(op, cpu) == auto
    with reg.use_backend("reference"):
        assert reg.resolve_backend(op, cpu) == "reference"
        seen = []
        th = threading.Thread(target=lambda: seen.append(reg.forced_backend()))
        th.start()
        th.join()
        assert seen == [None]  # use_backend is per thread
    assert reg.resolve_backend(op, cpu) == auto
    assert os.environ.get(reg.ENV_VAR) is None and reg.forced_backend() is None


def test_public_op_still_validates_before_writing():
    g, p, ea, es = _adam_args()
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got 1.5"):
        lowrank_kernels.ops.project_adam_(g, p, ea, es, side="right", beta1=1.5)
    with pytest.raises(TypeError, match="exp_avg_sq must have a floating dtype"):
        lowrank_kernels.ops.project_adam_(g, p, ea, es.to(torch.int32), side="right")
    assert torch.count_nonzero(ea) == 0 and torch.count_nonzero(es) == 0
