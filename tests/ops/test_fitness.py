"""The fitness tool itself (kernels/fitness.py): the signature it specialises, which modules it discovers, and that it
refuses the interpreter. The compile checks per op and target are tests/ops/test_fitness_<op>_sm<arch>.py."""

import pytest

from fastprefix.kernels import fitness
from fastprefix.kernels.attention import fused


def test_signature_specialisation():
    sig, constexprs, attrs = fitness.signature_of(fused._bwd_dkdv_kernel, {"Q": "*fp16"}, {"BLOCK_M": 32},
                                                  floats=("qk_hi",), ones=("stride_kn",),
                                                  multiples_of_16=("stride_qm",))
    names = fused._bwd_dkdv_kernel.arg_names
    assert sig["Q"] == "*fp16" and sig["qk_hi"] == "fp32" and sig["Sq"] == "i32"
    assert sig["BLOCK_M"] == sig["stride_kn"] == "constexpr" and constexprs["stride_kn"] == 1
    assert attrs[(names.index("stride_qm"),)] == [["tt.divisibility", 16]]
    assert (names.index("Sq"),) not in attrs


def test_discover_skips_modules_without_configs():
    assert fitness.discover(["fitness"]) == []
    assert fitness.discover(["no_such_kernel_module"]) == []


def test_measure_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fitness.measure(next(iter(fitness.discover(["attention.fused"]))))
