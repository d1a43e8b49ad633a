"""Final-norm calibration: lowers the loss, touches only the final norm, never makes it worse."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from inheritune.models.arch import get_arch
from inheritune.surgery import build as surgery
from inheritune.surgery.calibrate import calibrate_final_norm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibration_fits_only_the_final_norm(arch):
    torch.manual_seed(0)
    ref = tiny_model(arch, layers=4)
    with torch.no_grad():  # a final norm far off its best scale, as after truncation
        get_arch(ref).final_norm.weight.mul_(8.0)
    target = surgery.first_layers(ref, 2)
    before_state = {k: v.clone() for k, v in target.state_dict().items()}
    ids = torch.randint(3, 300, (4, 33))
    res = calibrate_final_norm(target, ids, iters=10)
    assert res["after"] < res["before"] - 0.05
    changed = {k for k, v in target.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed
    final_prefix = get_arch(target).layout.final_norm
    assert all(k.startswith(final_prefix) for k in changed)
    assert all(p.grad is None for p in target.parameters())


def test_calibration_never_leaves_the_model_worse(monkeypatch):
    target = surgery.first_layers(tiny_model("llama", layers=2), 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    class Useless(torch.optim.LBFGS):
        def step(self, closure):  # a step that ruins the parameters
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

    monkeypatch.setattr(torch.optim, "LBFGS", Useless)
    res = calibrate_final_norm(target, torch.randint(3, 300, (2, 17)), iters=2)
    assert res["after"] == res["before"]
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
