"""Every optimizer configuration replays a fixed gradient sequence to the committed weights.

The fixture (``python_tests/fixtures/step_replay.pt``) was written by
``python -m python_tests.fixtures.step_replay``; a refactor of the optimizers must keep
these steps bit-identical on CPU. Where torch's version or the CPU's vector ISA differ
from the machine that wrote it, BLAS may round differently: the comparison then allows
float32 rounding (and says so in the failure message).
"""
import pytest
import torch

from python_tests.fixtures import step_replay as sr

_DATA = torch.load(sr.FIXTURE, weights_only=True)
_SAME_MACHINE = _DATA["signature"] == sr.cpu_signature()


def test_fixture_covers_every_configuration():
    assert sorted(_DATA["weights"]) == sorted(sr.configs())


@pytest.mark.parametrize("name", sorted(sr.configs()))
def test_step_replay(name):
    got = sr.replay(sr.configs()[name], sr.dtype_of(name))
    want = _DATA["weights"][name]
    for k, w in want.items():
        if _SAME_MACHINE:
            assert torch.equal(got[k], w), f"{name}/{k}: steps differ from the committed fixture (max |d| = {(got[k] - w).abs().max().item():.3g})"
        else:
            torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}/{k} (other machine: {sr.cpu_signature()} vs {_DATA['signature']}): {m}")
