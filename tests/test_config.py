"""The environment switches of ``sla_numba/config.py`` that pick between kernels or
storage types: default when unset or empty, case and spaces ignored, and a value
outside the list is a ``ValueError`` naming the variable."""

import pytest

from sla_numba import config

# (variable, reader, default, another valid value written loosely, its value)
SWITCHES = [
    (config.MARGINAL_VAR, config.marginal_kernel, "pipelined", " Registers ", "registers"),
    (config.LINEAR_VAR, config.linear_kernel, "auto", " Registers ", "registers"),
    (config.LINEAR_GRAD_VAR, config.linear_grad_kernel, "pipelined", " Registers ", "registers"),
    (config.GRAD_STATES_VAR, config.grad_states_dtype, "auto", " BF16 ", "bf16"),
    (config.STATES_VAR, config.states_dtype, "auto", " FP32 ", "fp32"),
    (config.SPARSE_FWD_VAR, config.sparse_fwd_kernel, "auto", " WGMMA ", "wgmma"),
    (config.SPARSE_BWD_VAR, config.sparse_bwd_kernel, "sync", " Pipelined ", "pipelined"),
    (config.SAVE_STATES_VAR, config.save_states, False, " 1 ", True),
    (config.STATES_KERNEL_VAR, config.states_kernel, "auto", " Pipelined ", "pipelined"),
    (config.CLASSIFY_VAR, config.classify_kernel, "fused", " Scratch ", "scratch"),
]


@pytest.mark.parametrize("var,read,default,loose,value", SWITCHES, ids=[s[0] for s in SWITCHES])
def test_switch_default_values_and_refusal(monkeypatch, var, read, default, loose, value):
    monkeypatch.delenv(var, raising=False)
    assert read() == default
    monkeypatch.setenv(var, "")
    assert read() == default
    monkeypatch.setenv(var, loose)
    assert read() == value
    monkeypatch.setenv(var, "fast")
    with pytest.raises(ValueError, match=var):
        read()


@pytest.mark.parametrize(
    "var,reader",
    [(config.STATES_VAR, config.bf16_states), (config.GRAD_STATES_VAR, config.bf16_grad_states)],
)
def test_auto_storage_is_bf16_for_bf16_inputs_only(monkeypatch, var, reader):
    """``auto`` (the default) stores states in bf16 for bf16 inputs and in fp32 for
    fp16 inputs (an fp16 result is 8x finer than bf16); ``fp32`` / ``bf16`` force it."""
    monkeypatch.delenv(var, raising=False)
    assert reader("bf16") and not reader("f16")
    monkeypatch.setenv(var, "fp32")
    assert not reader("bf16") and not reader("f16")
    monkeypatch.setenv(var, "bf16")
    assert reader("bf16") and reader("f16")


def test_auto_kernel_choices(monkeypatch):
    """``auto`` of the sparse forward and of the states kernel: the kernels the H200
    measured faster (wgmma; staged for bf16 states) on a GPU, the reference kernels
    under the simulator (same results there); explicit values are taken as they are."""
    from sla_numba.gpu.tc import forward, states
    from sla_numba.gpu.tc.ptx import SIMULATED

    monkeypatch.delenv(config.SPARSE_FWD_VAR, raising=False)
    if SIMULATED:
        assert not forward.use_wgmma("bf16", 128, 64, 64)
        assert states.auto_variant(True) == states.auto_variant(False) == "registers"
    assert not forward.use_wgmma("float32", 128, 64, 64)  # never for what wgmma can't take
    assert not forward.use_wgmma("bf16", 128, 128, 64)
    monkeypatch.setenv(config.SPARSE_FWD_VAR, "wgmma")
    assert forward.use_wgmma("bf16", 128, 128, 64)  # the launch then refuses, naming it
    monkeypatch.setenv(config.SPARSE_FWD_VAR, "mma")
    assert not forward.use_wgmma("bf16", 128, 64, 64)
