"""The moment-format functions (``optim/moments.py``) on their own: the 8/16/32-bit choice,
new moments, the ops' arguments, zeroing, and conversions that round-trip."""
import pytest
import torch

from lowrank_kernels.optim import moments as fmt
from lowrank_kernels.reference import moments as mref

F32 = fmt.MomentFormat()
F16 = fmt.MomentFormat(bits=16)
F8 = fmt.MomentFormat(bits=8, block_size=32, min_8bit_size=64)


def _err(msg):
    return f"X: param group 0: {msg}"


def test_format_of_reads_the_group_keys_and_defaults():
    assert fmt.format_of({}) == F32
    assert fmt.format_of({"moment_bits": 8, "block_size": 32, "min_8bit_size": 64}) == F8
    assert fmt.format_of({"moment_bits": 16}) is fmt.format_of({"moment_bits": 16})  # memoized


@pytest.mark.parametrize("group,match", [
    ({"moment_dtype": "bf16"}, "moment_dtype must be"),
    ({"moment_bits": 4}, "moment_bits must be 32, 16 or 8"),
    ({"moment_bits": True}, "moment_bits must be"),
    ({"block_size": 0}, "block_size must be an int in"),
    ({"min_8bit_size": 1.5}, "min_8bit_size must be an int >= 0"),
    ({"moment_bits": 8, "moment_dtype": "param"}, "moment_bits=8 needs moment_dtype='float32'"),
])
def test_validate_names_the_key(group, match):
    with pytest.raises(ValueError, match=f"X: param group 0: {match}"):
        fmt.validate(group, _err)
    fmt.validate({}, _err)


def test_bits_for():
    assert fmt.bits_for((), F8) == 32                 # 0-d
    assert fmt.bits_for((7, 9), F8) == 32             # below min_8bit_size
    assert fmt.bits_for((100, 1), F8) == 32           # rows of one element: codes + absmax outweigh float32
    assert fmt.bits_for((10, 40), F8) == 8
    assert fmt.bits_for((3,), F16) == 16 and fmt.bits_for((), F16) == 32
    assert fmt.bits_for((10, 40), F32) == 32


@pytest.mark.parametrize("f,bits,dtype", [(F32, 32, torch.float32), (F16, 16, torch.bfloat16), (F8, 8, torch.uint8)])
def test_init_stored_bits_kwargs_and_zero(f, bits, dtype):
    state = {}
    fmt.init(state, f, (10, 40), device="cpu", param_dtype=torch.bfloat16)
    assert state["exp_avg"].dtype == dtype and state["exp_avg"].shape == (10, 40)
    assert fmt.stored_bits(state, f) == bits and fmt.is_lowbit(state, f) == (bits != 32)
    assert fmt.bucket_part(state, f) == ((8, 32) if bits == 8 else (bits, 0))
    seeds = []
    kw = fmt.op_kwargs(state, f, lambda: seeds.append(1) or 7)
    if bits == 8:
        assert state["exp_avg_absmax"].shape == (10, 2) and kw["block_size"] == 32
        assert kw["m_absmax"] is state["exp_avg_absmax"] and kw["v_absmax"] is state["exp_avg_sq_absmax"]
        assert fmt.update_dtype(state, torch.bfloat16) == torch.float32
    elif bits == 16:
        assert kw == {"moment_seed": 7}
    else:
        assert kw == {} and not seeds  # the seed is made only for 16-bit moments
    assert fmt.foreach_op_kwargs([kw, kw]) == ({} if not kw else {k: ([v, v] if k != "block_size" else v)
                                                                    for k, v in kw.items()})
    for t in state.values():
        t.fill_(3)
    fmt.zero(state)
    assert all(int(t.float().abs().sum()) == 0 for t in state.values())


def test_bfloat16_in_a_32_bit_group_is_not_lowbit():
    state = {"exp_avg": torch.zeros(4, 4, dtype=torch.bfloat16)}
    assert fmt.stored_bits(state, F32) == 32 and fmt.stored_bits(state, F16) == 16


def test_state_dtype():
    assert fmt.state_dtype(torch.bfloat16, F32) == torch.float32
    assert fmt.state_dtype(torch.float64, F32) == torch.float64
    assert fmt.state_dtype(torch.bfloat16, fmt.MomentFormat(dtype="param")) == torch.bfloat16


def _moments(shape=(10, 40), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"exp_avg": torch.randn(shape, generator=gen), "exp_avg_sq": torch.rand(shape, generator=gen)}


def test_convert_round_trips_32_8_32():
    state = _moments()
    orig = {k: v.clone() for k, v in state.items()}
    fmt.convert(state, F8, param_dtype=torch.float32, saved_block_size=256)
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq_absmax"].shape == (10, 2)
    codes = {k: v.clone() for k, v in state.items()}
    fmt.convert(state, F32, param_dtype=torch.float32, saved_block_size=32)
    assert set(state) == {"exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
    for key, signed in fmt.ADAM_MOMENTS:
        want = mref.moments_dequantize_ref(codes[key], codes[fmt.ABSMAX_KEYS[key]], signed=signed, block_size=32)
        assert torch.equal(state[key], want)
        torch.testing.assert_close(state[key], orig[key], rtol=0.05, atol=0.02 * orig[key].abs().max().item())
    # and back to 8-bit: decodes to the same values, up to the map's resolution
    decoded = {k: v.clone() for k, v in state.items()}
    fmt.convert(state, F8, param_dtype=torch.float32, saved_block_size=256)
    for key, signed in fmt.ADAM_MOMENTS:
        got = mref.moments_dequantize_ref(state[key], state[fmt.ABSMAX_KEYS[key]], signed=signed, block_size=32)
        torch.testing.assert_close(got, decoded[key], rtol=0.05, atol=0.02 * decoded[key].abs().max().item())


def test_convert_requantizes_for_another_block_size():
    state = _moments(seed=1)
    fmt.convert(state, F8, param_dtype=torch.float32, saved_block_size=256)
    vals = {k: mref.moments_dequantize_ref(state[k], state[fmt.ABSMAX_KEYS[k]], signed=s, block_size=32)
            for k, s in fmt.ADAM_MOMENTS}
    f64 = fmt.MomentFormat(bits=8, block_size=64, min_8bit_size=64)
    fmt.convert(state, f64, param_dtype=torch.float32, saved_block_size=32)
    assert state["exp_avg_absmax"].shape == (10, 1)
    for k, s in fmt.ADAM_MOMENTS:
        got = mref.moments_dequantize_ref(state[k], state[fmt.ABSMAX_KEYS[k]], signed=s, block_size=64)
        torch.testing.assert_close(got, vals[k], rtol=0.05, atol=0.02 * vals[k].abs().max().item())
    fmt.convert(state, f64, param_dtype=torch.float32, saved_block_size=64)  # same format: untouched
    assert state["exp_avg_absmax"].shape == (10, 1)


def test_convert_16_bit():
    state = _moments(seed=2)
    orig = {k: v.clone() for k, v in state.items()}
    fmt.convert(state, F16, param_dtype=torch.float32, saved_block_size=256)
    assert all(torch.equal(state[k], orig[k].to(torch.bfloat16)) for k in orig)
    fmt.convert(state, F32, param_dtype=torch.float32, saved_block_size=256)  # bfloat16 in a 32-bit group: kept
    assert state["exp_avg"].dtype == torch.bfloat16
    small = {"exp_avg": torch.randn(3, 3)}
    fmt.convert(small, F8, param_dtype=torch.float32, saved_block_size=256)  # below min_8bit_size: stays float
    assert small["exp_avg"].dtype == torch.float32


def test_check_saved_names_the_parameter():
    state = _moments()
    fmt.convert(state, F8, param_dtype=torch.float32, saved_block_size=256)
    fmt.check_saved(state, 32, fmt.ADAM_MOMENTS, "where")
    with pytest.raises(ValueError, match=r"where: the saved 8-bit exp_avg .* shape \(10, 1\) for the saved "
                                         r"group's block_size 64"):
        fmt.check_saved(state, 64, fmt.ADAM_MOMENTS, "where")
    del state["exp_avg_sq_absmax"]
    with pytest.raises(ValueError, match="exp_avg_sq_absmax"):
        fmt.check_saved(state, 32, fmt.ADAM_MOMENTS, "where")
