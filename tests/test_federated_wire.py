"""The federation's wire format and evaluation schedule, without starting Flower."""

import pytest
import torch

from fedbt.config import FederatedConfig
from fedbt.federated.strategy import make_strategy
from fedbt.federated.task import transport_state
from fedbt.model.architectures import build_resnet18


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def test_float16_transport_halves_the_bytes_and_keeps_integer_buffers():
    state = build_resnet18(4).state_dict()
    wire = transport_state(state, "float16")
    assert wire.keys() == state.keys()
    assert state_bytes(wire) < 0.51 * state_bytes(state)
    counts = [k for k in state if k.endswith("num_batches_tracked")]
    assert counts and all(wire[k].dtype == torch.int64 for k in counts)
    weight = state["layer1.0.conv1.weight"]
    assert torch.allclose(wire["layer1.0.conv1.weight"].float(), weight, rtol=1e-3, atol=1e-4)
    back = transport_state(wire, "float32")
    assert all(back[k].dtype == state[k].dtype for k in state)


def test_values_beyond_float16_range_stay_float32_instead_of_becoming_inf():
    wire = transport_state({"running_var": torch.tensor([1.0, 1e6])}, "float16")
    assert wire["running_var"].dtype == torch.float32
    assert torch.isfinite(wire["running_var"]).all()


def test_unknown_transport_dtype_and_bad_evaluation_interval_are_refused():
    with pytest.raises(ValueError, match="bfloat16"):
        make_strategy(FederatedConfig(transport_dtype="bfloat16"), 3)
    with pytest.raises(ValueError, match="evaluate_every"):
        make_strategy(FederatedConfig(evaluate_every=0), 3)


def test_sites_score_the_global_model_every_k_rounds_and_after_the_last():
    strategy = make_strategy(FederatedConfig(rounds=7, evaluate_every=3), 3)
    assert [r for r in range(1, 8) if strategy.evaluation_due(r)] == [3, 6, 7]
    # A skipped round sends no evaluation message at all (and never asks the grid for nodes).
    assert strategy.configure_evaluate(1, None, None, None) == []
    resumed = make_strategy(FederatedConfig(rounds=7, evaluate_every=3), 3, round_offset=2)
    assert resumed.configure_evaluate(2, None, None, None) == []  # absolute round 4
