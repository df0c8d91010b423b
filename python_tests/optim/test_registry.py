"""The optimizer registry (``lowrank_kernels.optim.registry``): every optimizer class is
registered, the defaults come from the classes, the capabilities agree with them, and each
entry's state-bytes formula equals the state a real first step allocates."""
import inspect
import warnings

import pytest
import torch

import lowrank_kernels.optim as O
from lowrank_kernels.optim import registry as R

NAMES = list(R.OPTIMIZERS)
#: exported Optimizer classes that are not optimizers one registers: the abstract base.
NOT_REGISTERED = {"LowRankOptimizer"}


def _model():
    torch.manual_seed(0)
    # wide (left side), tall (right side) and square-ish weights, biases (plain 1-D parameters)
    return torch.nn.Sequential(torch.nn.Linear(80, 24), torch.nn.Linear(24, 72, bias=False), torch.nn.Linear(72, 96))


def _groups(spec, model, **keys):
    if not spec.lowrank:
        return [dict(params=list(model.parameters()), **keys)]
    if spec.subspace == "density":
        return O.lowrank_param_groups(model, None, density=0.25, **keys)
    rank = None if spec.constructor == "mini" else 8  # APOLLO-Mini's preset gives rank 1
    return O.lowrank_param_groups(model, None, rank=rank, **keys)


def _first_step(spec, groups, model, **kwargs):
    opt = spec.build(groups, lr=1e-3, **kwargs)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_every_exported_optimizer_class_is_registered():
    exported = {n for n in O.__all__ if isinstance(getattr(O, n), type)
                and issubclass(getattr(O, n), torch.optim.Optimizer)} - NOT_REGISTERED
    registered = {s.cls.__name__ for s in R.OPTIMIZERS.values()}
    assert exported <= registered, exported - registered
    for n in exported:
        assert R.spec_for(getattr(O, n)), n


@pytest.mark.parametrize("name", NAMES)
def test_state_formula_equals_measured_bytes(name):
    spec = R.get(name)
    model = _model()
    groups = _groups(spec, model)
    opt = _first_step(spec, groups, model)
    assert R.state_nbytes(opt) == spec.expected_state_nbytes(groups, lr=1e-3) > 0


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("name", [n for n in NAMES if len(R.get(n).capabilities.moment_bits) > 1])
def test_state_formula_moment_formats(name, bits):
    """The formula follows the moment format (8-bit: codes + block maxima, small moments float32)."""
    spec = R.get(name)
    model = _model()
    keys = dict(moment_bits=bits, min_8bit_size=64, block_size=32)
    groups = _groups(spec, model, **keys)
    opt = _first_step(spec, groups, model)
    assert R.state_nbytes(opt) == spec.expected_state_nbytes(groups, lr=1e-3)
    want = torch.bfloat16 if bits == 16 else torch.uint8
    assert want in {v.dtype for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("kwargs", [dict(beta1=0.9), dict(beta1=0.9, moment_bits=8, min_8bit_size=64)])
def test_state_formula_adafactor_first_moment(kwargs):
    spec = R.get("adafactor")
    model = _model()
    groups = _groups(spec, model)
    opt = _first_step(spec, groups, model, **kwargs)
    assert R.state_nbytes(opt) == spec.expected_state_nbytes(groups, lr=1e-3, **kwargs)


def test_param_state_nbytes_by_hand():
    galore = R.get("galore")
    # (24, 40) at rank 8 projects on the left: step 4 + side 1 + moments 2*8*40*4 + projector 24*8*4
    assert galore.param_state_nbytes((24, 40), rank=8) == 4 + 1 + 2 * 8 * 40 * 4 + 24 * 8 * 4
    assert galore.param_state_nbytes((24,)) == 4 + 2 * 24 * 4  # plain: AdamW's
    assert R.get("dct").param_state_nbytes((56, 24), rank=8) == 4 + 1 + 2 * 56 * 8 * 4 + 8 * 4


@pytest.mark.parametrize("name", NAMES)
def test_defaults_come_from_the_class(name):
    spec = R.get(name)
    sig = {k: v.default for k, v in inspect.signature(spec.cls.__init__).parameters.items()
           if v.default is not inspect.Parameter.empty}
    for key, value in spec.defaults.items():
        assert key in sig, key
        if key not in spec.settings and spec.constructor is None:
            assert value == sig[key] or (value != value and sig[key] != sig[key]), key
    for key, value in spec.settings.items():
        assert spec.defaults[key] == value
    if spec.constructor is not None:  # the classmethod's preset: the class with the defaults builds the same
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = getattr(spec.cls, spec.constructor)([torch.zeros(2, 2, requires_grad=True)])
            plain = spec.cls([torch.zeros(2, 2, requires_grad=True)], **spec.defaults)
        assert plain.defaults == built.defaults


@pytest.mark.parametrize("name", [n for n in NAMES if R.get(n).target.startswith("lowrank_kernels.")])
def test_capabilities_agree_with_the_class(name):
    spec = R.get(name)
    cls, caps = spec.cls, spec.capabilities
    assert caps.capturable == bool(cls.__dict__.get("supports_capturable", False))
    takes_bits = "moment_bits" in inspect.signature(cls.__init__).parameters
    assert (len(caps.moment_bits) > 1) <= takes_bits
    assert caps.moment_bits[0] == 32 and set(caps.moment_bits) <= {32, 16, 8}
    # bucketed: the class steps by bucket (a bucket key of its own) and no override of the
    # per-parameter path the bucketed step replaces
    owner = next(k for k in cls.__mro__ if "_bucket_key" in k.__dict__)
    own = ("_project_step", "_lowrank_step", "_get_projector", "_should_refresh", "_has_projector", "step")
    derived = bool(cls.bucketed) and owner is not O.LowRankOptimizer and all(
        getattr(cls, n) is getattr(owner, n) for n in own)
    assert caps.bucketed == derived


@pytest.mark.parametrize("name", [n for n in NAMES if not R.get(n).capabilities.distributed])
def test_no_distributed_capability_means_refused(name):
    """An entry without FSDP2 support refuses DTensor parameters (checked in the source; the
    distributed tests run the supported ones)."""
    src = inspect.getsource(R.get(name).cls)
    assert "is_dtensor(p)" in src and "does not support" in src


def test_get_accepts_aliases_and_names_unknown():
    assert R.get("galore_adamw") is R.get("galore")
    assert R.get("apollo_mini").constructor == "mini"
    with pytest.raises(ValueError, match="unknown optimizer 'nope'.*galore"):
        R.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        R.register(R.get("galore"))


def test_fixed_settings_are_refused():
    probe = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="relative_step"):
        R.get("adafactor").build([probe], lr=1e-3, relative_step=True)


def test_state_nbytes_counts_each_storage_once_and_layerwise():
    model = torch.nn.Linear(7, 5)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert O.state_nbytes(opt) == 2 * 4 * n + 4 * 2
    st = opt.state[model.weight]
    st["alias"] = st["exp_avg"][:1]  # a view: no new storage
    assert O.state_nbytes(opt) == 2 * 4 * n + 4 * 2
    lw = O.layerwise([{"params": list(model.parameters())}], lambda g: torch.optim.AdamW(g))
    model.zero_grad()
    model(torch.randn(3, 7)).sum().backward()
    assert O.state_nbytes(lw) == 2 * 4 * n + 4 * 2
    lw.remove_hooks()
