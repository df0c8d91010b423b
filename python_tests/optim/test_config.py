"""The shared hyper-parameters (``optim/config.py``): every optimizer takes every shared keyword
(or refuses a value it cannot honour, by name), keeps its own defaults, and bad input raises an
error naming the optimizer, the param group and the keyword, with no optimizer built and no
group added."""
import inspect
import warnings

import pytest
import torch

from lowrank_kernels import optim as lo
from lowrank_kernels.optim.config import SHARED_KEYS, OptimizerConfig

CLASSES = [lo.GaLoreAdamW, lo.DCTAdamW, lo.QGaLoreAdamW, lo.APOLLOAdamW, lo.FrugalAdamW, lo.GradNormLoRPAdamW, lo.FiraAdamW,
           lo.GaLoreAdafactor]
#: the shared keywords a class does not take (Adafactor has beta1 / decay_rate instead of betas).
ABSENT = {lo.GaLoreAdafactor: {"betas"}}
#: one bad value per shared keyword: (value, error type, what the message says).
BAD = {
    "lr": (-1.0, ValueError, "lr must be"),
    "betas": ((0.9, 1.5), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    "eps": (-1e-8, ValueError, "eps must be"),
    "weight_decay": (-0.1, ValueError, "weight_decay must be a float >= 0"),
    "rank": (-1, ValueError, "rank must be an int >= "),
    "update_proj_gap": (0, ValueError, "update_proj_gap must be an int >= 1"),
    "scale": (float("nan"), ValueError, "scale must be a finite float"),
    "proj_type": ("diagonal", ValueError, "proj_type must be one of"),
    "skip_nonfinite": ("yes", TypeError, "skip_nonfinite must be a bool"),
    "foreach": ("yes", TypeError, "foreach must be None or a bool"),
    "moment_dtype": ("float16", ValueError, "moment_dtype must be 'float32'"),
    "moment_bits": (4, ValueError, "moment_bits must be 32, 16 or 8"),
    "block_size": (512, ValueError, r"block_size must be an int in \[1, 256\]"),
    "min_8bit_size": (-1, ValueError, "min_8bit_size must be an int >= 0"),
    "refresh_sharing": ("rank0", ValueError, "refresh_sharing must be one of 'owner', 'replicate'"),
}


def _cases():
    return [pytest.param(cls, key, id=f"{cls.__name__}-{key}")
            for cls in CLASSES for key in SHARED_KEYS if key not in ABSENT.get(cls, ())]


def _quiet(cls, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(params, **kw)


def test_every_shared_keyword_is_covered():
    assert sorted(BAD) == sorted(SHARED_KEYS)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_constructor_takes_the_shared_keywords_with_its_own_defaults(cls):
    sig = inspect.signature(cls.__init__).parameters
    missing = [k for k in SHARED_KEYS if k not in sig and k not in ABSENT.get(cls, ())]
    assert not missing, f"{cls.__name__} lacks the shared keywords {missing}"
    opt = _quiet(cls, [torch.nn.Parameter(torch.randn(8, 6))])
    for key in SHARED_KEYS:
        if key in sig:
            assert opt.defaults[key] == sig[key].default, key
        else:
            assert key not in opt.defaults, key


@pytest.mark.parametrize("cls,key", _cases())
def test_bad_shared_keyword_raises_naming_it_and_builds_nothing(cls, key):
    value, err, what = BAD[key]
    w = torch.nn.Parameter(torch.randn(8, 6))
    before = w.detach().clone()
    built = []
    with pytest.raises(err, match=rf"{cls.__name__}: param group 0: .*{what}"):
        built.append(_quiet(cls, [w], **{"rank": 2, key: value}))
    assert not built and torch.equal(w, before)
    # the same value in a group added later: nothing is added
    opt = _quiet(cls, [torch.nn.Parameter(torch.randn(8, 6))], rank=2)
    q = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(err, match=rf"{cls.__name__}: param group 1: .*{what}"):
        opt.add_param_group({"params": [q], "rank": 2, key: value})
    assert len(opt.param_groups) == 1 and q not in opt._param_index and not opt.state


def test_adafactor_refuses_what_it_cannot_honour():
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="param group 0: moment_dtype must be 'float32'.*got 'param'"):
        lo.GaLoreAdafactor([w], rank=2, moment_dtype="param")
    with pytest.raises(ValueError, match="param group 0: capturable=True is not supported by GaLoreAdafactor"):
        lo.GaLoreAdafactor([{"params": [w], "capturable": True}], rank=2)
    for foreach in (None, True, False):  # accepted: by bucket (None, True) or one parameter at a time (False)
        lo.GaLoreAdafactor([w], rank=2, foreach=foreach)


def test_gradnormlorp_honours_moment_dtype():
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.bfloat16))
    opt = lo.GradNormLoRPAdamW([w], rank=2, moment_dtype="param")
    w.grad = torch.randn_like(w)
    opt.step()
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["wn_g"].dtype == torch.float32
    assert torch.isfinite(w.float()).all()
    opt32 = lo.GradNormLoRPAdamW([torch.nn.Parameter(w.detach().clone())], rank=2)
    assert opt32.defaults["moment_dtype"] == "float32"


def test_from_arguments_names_a_missing_keyword():
    args = {k: getattr(OptimizerConfig(), k) for k in SHARED_KEYS if k != "foreach"}
    with pytest.raises(TypeError, match="lacks the shared keyword 'foreach'"):
        OptimizerConfig.from_arguments(args)
    cfg = OptimizerConfig.from_arguments(args, foreach=False)
    assert cfg.defaults(extra=1) == {**args, "foreach": False, "extra": 1}
    assert "betas" not in OptimizerConfig.from_arguments(args, foreach=None, betas=None).defaults()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unknown_keyword_raises_type_error_naming_constructor_and_keyword(cls):
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(TypeError, match=rf"{cls.__name__}.__init__\(\) got an unexpected keyword argument 'rnak'"):
        cls([w], rnak=2)


@pytest.mark.parametrize("cls", [c for c in CLASSES if "betas" in inspect.signature(c.__init__).parameters],
                         ids=lambda c: c.__name__)
def test_shared_positional_keywords_follow_params_in_adamw_order(cls):
    """``cls(params, lr, betas, eps, weight_decay)`` positionally, as torch.optim.AdamW."""
    names = list(inspect.signature(cls.__init__).parameters)[:6]
    assert names == ["self", "params", "lr", "betas", "eps", "weight_decay"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls([torch.nn.Parameter(torch.randn(8, 6))], 0.5, (0.8, 0.9), 1e-3, 0.2)
    assert [opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")] == [0.5, (0.8, 0.9), 1e-3, 0.2]
