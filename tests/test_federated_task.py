"""A site's local training (Flower-free): what each local epoch is anchored to and what it reports."""

import torch

import fedbt.federated.task as task
from fedbt.config import ExperimentConfig, FederatedConfig, ModelConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.partition import make_partitions
from fedbt.train.setup import new_model


def test_fedprox_anchors_every_local_epoch_to_the_rounds_global_model(data_config, monkeypatch):
    cfg = ExperimentConfig(
        data=data_config,
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=1, batch_size=16, threads=1, log_every=0),
        federated=FederatedConfig(strategy="fedprox", proximal_mu=0.1, local_epochs=2, rounds=1),
    )
    catalog = build_catalog(cfg.data, progress=False)
    partition = make_partitions(catalog, 3)[0]
    global_state = new_model(cfg, catalog.task.num_classes).state_dict()
    anchors, epochs, real_epoch = [], [], task.train_epoch

    def recording_epoch(setup, *args, anchor=None, **kwargs):
        anchors.append([a.clone() for a in anchor])
        epochs.append(real_epoch(setup, *args, anchor=anchor, **kwargs))
        return epochs[-1]

    monkeypatch.setattr(task, "train_epoch", recording_epoch)
    state, _, metrics, _ = task.train_partition(cfg, catalog, partition, global_state, 1, task.LocalState())
    global_params = [global_state[name] for name, _ in new_model(cfg, 4).named_parameters()]
    assert len(anchors) == 2
    for anchor in anchors:  # both epochs pull towards the global model, not towards the previous epoch
        assert all(torch.equal(a, g) for a, g in zip(anchor, global_params))
    assert not torch.equal(state["classifier.4.weight"], global_state["classifier.4.weight"])  # it did train
    # Time and loss cover both local epochs, not the last one only.
    assert metrics["train_seconds"] == sum(e["seconds"] for e in epochs)
    images = sum(e["images"] for e in epochs)
    assert metrics["train_loss"] == sum(e["loss"] * e["images"] for e in epochs) / images
