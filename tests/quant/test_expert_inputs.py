"""quant.expert_inputs: the static input scale of a routed expert calibration never reached."""

import torch

from quant.expert_inputs import expert_input_amax


def test_an_expert_with_tokens_keeps_its_own_and_siblings_are_not_read():
    def never():
        raise AssertionError("siblings read for an expert that saw tokens")
    assert expert_input_amax(torch.tensor(1.5), 3, never) == 1.5


def test_an_expert_without_tokens_takes_the_max_over_the_layer():
    amaxes = [torch.tensor(v) for v in (0.5, 7.25, 0.0, 2.0)]
    assert expert_input_amax(amaxes[2], 0, lambda: amaxes) == 7.25
