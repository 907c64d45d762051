import os

import pytest
import torch

from lorakit import cli, env


@pytest.mark.hardware
def test_auto_device_is_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without a GPU")
    assert env.pick_device("auto").type in ("cpu", "mps")


def test_unknown_or_absent_device_is_explained():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        env.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            env.pick_device("cuda")


def test_bf16_by_compute_capability_not_is_bf16_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 may say
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert not env.bf16_supported("cuda")
    assert env.compute_dtype("cuda") == torch.float16
    with pytest.raises(ValueError, match="Tesla T4 .*capability 7.5.*float16"):
        env.check_dtype(torch.bfloat16, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert env.compute_dtype("cuda") == torch.bfloat16


X86_AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False}  # a laptop since 2021
X86_SPR = {**X86_AVX2, "avx512_bf16": True, "amx_bf16": True}                                  # Sapphire Rapids


@pytest.mark.parametrize("caps, onednn, isa_cap, native, why", [
    (X86_AVX2, False, None, False, "no bf16 units"),
    (X86_AVX2, True, None, False, "no bf16 units"),        # oneDNN says yes on AVX-512 CPUs without bf16 units
    (X86_SPR, True, None, True, "AMX-BF16 and AVX512-BF16"),
    (X86_SPR, True, "AVX2", False, "ONEDNN_MAX_CPU_ISA=AVX2"),
    (X86_SPR, True, "avx512_core", False, "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
    (X86_SPR, True, "AVX512_CORE_AMX", True, "AMX-BF16"),
    (X86_SPR, False, None, False, "oneDNN does not use it"),
    ({"architecture": "arm64", "bf16": False}, False, None, False, "no bf16 extension"),
    ({"architecture": "arm64", "bf16": True}, True, None, True, "bf16 extension"),
])
def test_cpu_bf16_only_with_bf16_units_that_onednn_uses(monkeypatch, caps, onednn, isa_cap, native, why):
    monkeypatch.setattr(env, "cpu_capabilities", lambda: dict(caps))
    monkeypatch.setattr(env, "_onednn_bf16", lambda: onednn)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa_cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    got, reason = env.cpu_bf16()
    assert got is native and why in reason
    assert env.bf16_supported("cpu") is native
    assert env.compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    if not native:
        assert "float32" in reason  # says what the kit does instead


@pytest.mark.slow  # 5 s: starts a fresh interpreter
def test_avx2_only_cpu_computes_in_float32():
    """The switches that make this machine an AVX2-only CPU (as most laptops are) really take the slow path,
    and the kit then picks float32 and says why, in `lorakit env` too."""
    import subprocess
    import sys
    probe = ("import torch; from lorakit import env, cli; "
             "print(torch.backends.cpu.get_cpu_capability(), torch.ops.mkldnn._is_mkldnn_bf16_supported(), "
             "env.compute_dtype('cpu'), env.bf16_supported('cpu')); cli.main(['env', '--device', 'cpu'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}).stdout
    assert out.splitlines()[0] == "AVX2 False torch.float32 False"
    line = next(l for l in out.splitlines() if "compute dtype" in l)
    assert "float32" in line and "emulated" in line, line


def test_one_avx512_bf16_detector_agrees_with_bitsandbytes():
    """bitsandbytes repacks 4-bit weights for its CPU kernel (trap 1) when its own detector says yes."""
    from bitsandbytes.functional import has_avx512bf16
    assert env.avx512_bf16() == bool(has_avx512bf16())


def test_four_bit_works_and_reports_a_broken_install(monkeypatch):
    ok, detail = env.four_bit_works("cpu")
    assert ok, detail
    import bitsandbytes.functional as F
    monkeypatch.setattr(F, "quantize_4bit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel")))
    ok, detail = env.four_bit_works("cpu")
    assert not ok and "no kernel" in detail


def test_cli_env_prints_a_table(capsys):
    assert cli.main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for item in ("torch", "bitsandbytes", "compute dtype", "4-bit (NF4)"):
        assert item in out
    assert "OK" in out


def test_scoped_environ_sets_for_the_block_and_puts_back(monkeypatch):
    monkeypatch.setenv("LORAKIT_TEST_SET", "before")
    monkeypatch.delenv("LORAKIT_TEST_UNSET", raising=False)
    with env.scoped_environ(LORAKIT_TEST_SET="inside", LORAKIT_TEST_UNSET="new"):
        assert os.environ["LORAKIT_TEST_SET"] == "inside" and os.environ["LORAKIT_TEST_UNSET"] == "new"
        with env.scoped_environ(LORAKIT_TEST_SET="nested"):  # one thread may nest blocks
            assert os.environ["LORAKIT_TEST_SET"] == "nested"
        assert os.environ["LORAKIT_TEST_SET"] == "inside"
    assert os.environ["LORAKIT_TEST_SET"] == "before" and "LORAKIT_TEST_UNSET" not in os.environ
    with pytest.raises(RuntimeError), env.scoped_environ(LORAKIT_TEST_SET="boom"):
        raise RuntimeError("restored even when the block fails")
    assert os.environ["LORAKIT_TEST_SET"] == "before"
