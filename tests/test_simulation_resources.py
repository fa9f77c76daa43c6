"""What each simulated client asks Ray for: every core on a CPU (clients in turn), a share of the
GPU and of the cores on CUDA (clients at once)."""

from __future__ import annotations

import pytest

from fedbt.config import load_config
from fedbt.federated.simulation import client_resources


def experiment(*overrides: str):
    return load_config(["configs/demo.yaml"], list(overrides))


def test_on_a_cpu_each_client_takes_every_core_so_they_train_in_turn():
    assert client_resources(experiment(), cores=2, cuda=False) == {"num_cpus": 2, "num_gpus": 0.0}


def test_on_a_gpu_all_clients_share_it_and_the_cores_by_default():
    resources = client_resources(experiment("federated.num_clients=3"), cores=16, cuda=True)
    assert resources["num_cpus"] == 5 and resources["num_gpus"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(("per_gpu", "cpus", "gpu_share"), [(1, 16, 1.0), (2, 8, 0.5), (6, 5, 1 / 3)])
def test_clients_per_gpu_sets_how_many_train_at_once(per_gpu, cpus, gpu_share):
    cfg = experiment("federated.num_clients=3", f"federated.clients_per_gpu={per_gpu}")
    resources = client_resources(cfg, cores=16, cuda=True)
    # More per GPU than there are clients is as many as there are clients.
    assert resources["num_cpus"] == cpus and resources["num_gpus"] == pytest.approx(gpu_share)


def test_a_client_never_asks_for_less_than_one_core():
    resources = client_resources(experiment("federated.num_clients=6"), cores=2, cuda=True)
    assert resources["num_cpus"] == 1 and resources["num_gpus"] == pytest.approx(1 / 6)
