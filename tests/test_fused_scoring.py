"""A deployment round moves the global model to each site once: the sites score the model they
receive for training before training on it, so round r's scores ride on round r+1's message and
only the final model gets messages of its own (its validation, which also calibrates it, and its test).

The server's real round (fedbt.federated.server_app) runs against three sites whose ClientApp
handlers are called in this process, as their SuperNodes would call them.
"""

from collections import Counter

import pytest
from flower_messages import server_request
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedbt.config import DataConfig, ExperimentConfig, FederatedConfig, ModelConfig, TrackingConfig, TrainConfig
from fedbt.federated import client_app
from fedbt.federated.common import NODE_CACHE_DIR, NODE_DATA_ROOT, NODE_SITE, ROUND_KEY
from fedbt.federated.server_app import run_federated

ROUNDS = 3


class SitesInProcess:
    """A Grid whose sites are the ClientApp's handlers, called here; it counts the global models
    sent to each node in each round."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts
        self.replies: dict[str, Message] = {}
        self.models_sent: Counter = Counter()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            config = dict(message.content["config"])
            self.models_sent[(int(config[ROUND_KEY]), node)] += 1
            message_id = f"m{len(self.replies) + len(ids)}-{node}"
            incoming = server_request(kind, config, message.content["arrays"], node=node, message_id=message_id)
            handler = client_app.train if kind == MessageType.TRAIN else client_app.evaluate
            self.replies[message_id] = handler(incoming, self.contexts[node])
            ids.append(message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies[i] for i in ids if i in self.replies]


@pytest.fixture()
def hospital_sites(demo_root, site_files, tmp_path) -> dict[int, Context]:
    """Three nodes as `fedbt site --site sites/<site>.yaml --data-root ... --cache-dir ...` start them."""
    contexts = {}
    for node, site_file in enumerate(site_files, start=11):
        config = {NODE_SITE: site_file, NODE_DATA_ROOT: str(demo_root), NODE_CACHE_DIR: str(tmp_path / f"cache{node}")}
        contexts[node] = Context(run_id=7, node_id=node, node_config=config, state=RecordDict(), run_config={})
    return contexts


def test_each_round_sends_the_global_model_to_each_site_once_and_every_round_is_scored(
    hospital_sites, tmp_path, monkeypatch
):
    # The ServerApp's process knows its run and node: Flower stamps them on every message it creates.
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = ExperimentConfig(
        output_dir=str(tmp_path / "out"),
        data=DataConfig(image_size=32),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=16, log_every=0),
        federated=FederatedConfig(rounds=ROUNDS, num_clients=3, poll_interval=0.01, round_timeout=60),
        tracking=TrackingConfig(enabled=False),
    )
    grid = SitesInProcess(hospital_sites)
    result = run_federated(grid, cfg, server_has_data=False)
    for node in hospital_sites:
        # Training only, until the last round: then the final model's validation and its test as well.
        assert [grid.models_sent[(r, node)] for r in range(1, ROUNDS + 1)] == [1] * (ROUNDS - 1) + [3]
    assert sum(grid.models_sent.values()) == len(hospital_sites) * (ROUNDS + 2)
    # Each round's model was scored at every site: on the next round's message, the last on its own.
    assert [sorted(entry["sites"]) for entry in result["history"]] == [["br35h", "figshare", "sartaj"]] * ROUNDS
    assert set(result["test"]["sites"]) == {"br35h", "figshare", "sartaj"}
