"""Mixed precision follows what the hardware does natively: bf16 on GPUs of compute capability
8.0 and newer, fp16 with a gradient scaler on older ones (the T4 of free Colab), fp32 below;
on CPUs bf16 only with native instructions. fp16 with the scaler survives an overflowing step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.common import env


@pytest.mark.parametrize("capability, dtype", [
    ((9, 0), torch.bfloat16),  # H100
    ((8, 0), torch.bfloat16),  # A100
    ((7, 5), torch.float16),  # T4 (Colab): torch can emulate bf16 there, slowly
    ((7, 0), torch.float16),  # V100
    ((6, 0), torch.float16),  # P100
    ((3, 7), None),  # K80
])
def test_gpu_precision_comes_from_the_compute_capability(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulation answers
    monkeypatch.delenv("MSDSEG_AMP", raising=False)
    assert env.amp_dtype(torch.device("cuda")) == dtype
    monkeypatch.setenv("MSDSEG_AMP", "0")
    assert env.amp_dtype(torch.device("cuda")) is None


@pytest.mark.parametrize("native", [True, False])
def test_cpu_precision_is_bf16_only_with_native_instructions(monkeypatch, native):
    monkeypatch.delenv("MSDSEG_AMP", raising=False)
    for probe in env._NATIVE_BF16_PROBES:
        monkeypatch.setattr(torch.cpu, probe, lambda native=native: native, raising=False)
    assert env.amp_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert not env.grad_scaler(torch.device("cpu")).is_enabled()  # bf16 and fp32 need no scaler


def test_fp16_with_the_scaler_skips_an_overflowing_step_and_trains_on(monkeypatch):
    monkeypatch.setattr(env, "amp_dtype", lambda device: torch.float16)  # fp16 as on a T4, here on the CPU
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = env.grad_scaler(device, init_scale=2.0**40)  # the first steps overflow fp16
    assert scaler.is_enabled()
    x, y = torch.randn(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    before = [p.detach().clone() for p in model.parameters()]
    scales = []
    for _ in range(40):
        with env.autocast(device):
            loss = nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales[0] < 2.0**40  # the overflowing step was skipped and the scale backed off
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # and training went on
    assert torch.isfinite(loss)
