"""A deployment round moves the global model to each site once: the sites score the model they
receive for training before training on it, so round r's scores ride on round r+1's message and
only the final model gets messages of its own (its validation, which also calibrates it, and its test).

The federated core's round (fedbt.fl.server) runs in memory against three hospital sites
(fedbt.fl.site.answer with the node config `fedbt site` gives them); every request sent is counted.
"""

import functools
from collections import Counter

import pytest

from fedbt.config import DataConfig, ExperimentConfig, FederatedConfig, ModelConfig, TrackingConfig, TrainConfig
from fedbt.fl.protocol import NODE_CACHE_DIR, NODE_DATA_ROOT, NODE_SITE
from fedbt.fl.server import run_federated
from fedbt.fl.site import SiteContext, answer
from fedbt.fl.transport import InMemoryTransport

ROUNDS = 3


@pytest.fixture()
def hospital_sites(demo_root, site_files, tmp_path) -> InMemoryTransport:
    """Three nodes as `fedbt site --site sites/<site>.yaml --data-root ... --cache-dir ...` start them."""
    sites = {}
    for node, site_file in enumerate(site_files, start=11):
        config = {NODE_SITE: site_file, NODE_DATA_ROOT: str(demo_root), NODE_CACHE_DIR: str(tmp_path / f"cache{node}")}
        sites[node] = functools.partial(answer, context=SiteContext(config, run_id=7))
    return InMemoryTransport(sites)


def test_each_round_sends_the_global_model_to_each_site_once_and_every_round_is_scored(hospital_sites, tmp_path):
    cfg = ExperimentConfig(
        output_dir=str(tmp_path / "out"),
        data=DataConfig(image_size=32),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=16, log_every=0),
        federated=FederatedConfig(rounds=ROUNDS, num_clients=3, poll_interval=0.01, round_timeout=60),
        tracking=TrackingConfig(enabled=False),
    )
    result = run_federated(hospital_sites, cfg, server_has_data=False, clock=hospital_sites.clock)
    models_sent = Counter((request.round, request.node) for request in hospital_sites.sent)
    for node in hospital_sites.sites:
        # Training only, until the last round: then the final model's validation and its test as well.
        assert [models_sent[(r, node)] for r in range(1, ROUNDS + 1)] == [1] * (ROUNDS - 1) + [3]
    assert sum(models_sent.values()) == len(hospital_sites.sites) * (ROUNDS + 2)
    # Each round's model was scored at every site: on the next round's request, the last on its own.
    assert [sorted(entry["sites"]) for entry in result["history"]] == [["br35h", "figshare", "sartaj"]] * ROUNDS
    assert set(result["test"]["sites"]) == {"br35h", "figshare", "sartaj"}
