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
