"""torchtitan (``lowrank_kernels.integrations.torchtitan``), 2 gloo processes on the CPU with
FSDP2: a job's optimizer config names GaLoreAdamW (rank, gap, scale, projector, target
modules, 8-bit moments); torchtitan's optimizer container builds it over the model parts,
its LR scheduler drives the learning rate, and its ``CheckpointManager`` (DCP) saves at
step 3; a fresh job loads that checkpoint and continues to step 5 bitwise equal to the
uninterrupted run. Creating the state for checkpointing before any step runs no SVD, and
the first real step refreshes. (torchtitan's trainer itself cannot train on a CPU: see
``_torchtitan_worker``.)"""
import pytest

pytest.importorskip("torchtitan.components.optimizer", reason="torchtitan is not installed (requirements-nodeps.txt)")

from .. import _dist  # noqa: E402
from . import _torchtitan_worker  # noqa: E402

pytestmark = pytest.mark.slow  # spawns 2 processes (about a minute on a loaded 2-core machine)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = _dist.run_ranks(_torchtitan_worker.worker, str(tmp_path_factory.mktemp("titan")))
    for r in res:
        assert "error" not in r, r["error"][1]
    return res


def test_container_builds_our_optimizer_from_a_job_config(results):
    _dist.check(results, "container")
    _dist.check(results, "class")


def test_checkpoint_resume_continues_bitwise(results):
    _dist.check(results, "resume_bitwise")


def test_state_creation_for_checkpointing_takes_no_projector_from_zeros(results):
    _dist.check(results, "init_then_train")


def test_names_and_patterns():
    from lowrank_kernels.integrations import torchtitan as tt

    assert tt.spec_for_name("GaLoreAdamW").name == "galore"
    assert tt.spec_for_name("galore_adamw").name == "galore"
    assert tt.spec_for_name("apollo-mini").constructor == "mini"
    assert tt.spec_for_name("AdamW") is None
    with pytest.raises(ValueError, match="no optimizer named 'GaLore'"):
        tt.optimizer_factory("GaLore")
    import re

    pat = re.compile(tt.target_pattern(("attention", "feed_forward")))
    assert pat.search("layers.0.attention.qkv_linear.wqkv.weight")
    assert pat.search("layers.11.feed_forward.w2.weight")
    assert not pat.search("layers.0.attention_norm.weight")
    assert not pat.search("lm_head.weight")
    with pytest.raises(ValueError, match="pass rank"):
        tt.lowrank_optimizer_config("GaLoreAdamW", lr=1e-3)
    with pytest.raises(ValueError, match="no projector choice"):
        tt.lowrank_optimizer_config("DCTAdamW", lr=1e-3, rank=4, projector="exact")
    cfg = tt.lowrank_optimizer_config("frugal", lr=1e-3, density=0.25, projector="svd")
    low, plain = cfg.param_groups
    assert low.optimizer_kwargs["projection"] == "svd" and low.optimizer_kwargs["density"] == 0.25
    assert plain.optimizer_kwargs["rank"] is None and plain.optimizer_kwargs["density"] is None
