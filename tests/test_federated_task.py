"""A site's local training (Flower-free): what each local epoch is anchored to, which batches a
round trains, and what it reports."""

import pytest
import torch

import fedbt.fl.task as task
from fedbt.config import ExperimentConfig, FederatedConfig, ModelConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.partition import make_partitions
from fedbt.train.losses import coarse_label_loss
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
    anchors, criteria, epochs = [], [], []
    real_criterion, real_epoch = task.site_criterion, task.train_epoch

    def recording_criterion(*args, anchor=None, **kwargs):
        anchors.append(anchor)  # the live tensors: whatever training does to them shows at the end
        return real_criterion(*args, anchor=anchor, **kwargs)

    def recording_epoch(setup, *args, criterion=None, **kwargs):
        criteria.append(criterion)
        epochs.append(real_epoch(setup, *args, criterion=criterion, **kwargs))
        return epochs[-1]

    monkeypatch.setattr(task, "site_criterion", recording_criterion)
    monkeypatch.setattr(task, "train_epoch", recording_epoch)
    state, _, metrics, _ = task.train_partition(cfg, catalog, partition, global_state, 1, task.LocalState())
    global_params = [global_state[name] for name, _ in new_model(cfg, 4).named_parameters()]
    # One FedProx loss for both local epochs, anchored at the round's global model, which training
    # left as it was: both epochs pull towards the global model, not towards the previous epoch.
    assert len(anchors) == 1 and len(epochs) == 2 and criteria[0] is criteria[1]
    assert all(torch.equal(a, g) for a, g in zip(anchors[0], global_params, strict=True))
    # Its loss is the coarse-label loss plus mu/2 x the squared distance of the weights (as trained) to that model.
    logits, masks = torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool)
    names = [name for name, _ in new_model(cfg, 4).named_parameters()]
    distance = sum(float((state[n] - global_state[n]).square().sum()) for n in names)
    added = float(criteria[0](logits, masks) - coarse_label_loss(logits, masks))
    assert distance > 0 and added == pytest.approx(0.1 / 2 * distance, rel=1e-4)
    assert not torch.equal(state["classifier.4.weight"], global_state["classifier.4.weight"])  # it did train
    # Time and loss cover both local epochs, not the last one only.
    assert metrics["train_seconds"] == sum(e["seconds"] for e in epochs)
    images = sum(e["images"] for e in epochs)
    assert metrics["train_loss"] == sum(e["loss"] * e["images"] for e in epochs) / images


@pytest.mark.parametrize(("local_epochs", "rounds"), [(1, 3), (2, 2), (0.5, 6), (0.25, 8), (1 / 3, 6)])
def test_rounds_share_out_every_epochs_batches_once_and_in_order(local_epochs, rounds):
    steps = 10
    trained = [
        (epoch, batch)
        for server_round in range(1, rounds + 1)
        for epoch, batches in task.round_batches(local_epochs, server_round, steps)
        for batch in batches
    ]
    total_epochs = round(rounds * local_epochs)
    assert trained == [(epoch, batch) for epoch in range(total_epochs) for batch in range(steps)]


def test_two_rounds_of_half_an_epoch_train_the_batches_of_one_whole_epoch(data_config):
    def site_config(rounds, local_epochs):
        # Nothing random but the batch order: no augmentation, no dropout. A constant LR, so that the
        # second half's steps move the weights as much as the first's.
        return ExperimentConfig(
            data=data_config,
            model=ModelConfig(name="cnn", dropout=0.0),
            train=TrainConfig(batch_size=4, schedule="constant", threads=1, log_every=0, augment=False),
            federated=FederatedConfig(rounds=rounds, local_epochs=local_epochs),
        )

    whole, halves = site_config(1, 1), site_config(2, 0.5)
    catalog = build_catalog(data_config, progress=False)
    partition = make_partitions(catalog, 3)[0]
    global_state = new_model(whole, catalog.task.num_classes).state_dict()

    after_epoch, *_ = task.train_partition(whole, catalog, partition, global_state, 1, task.LocalState())
    after_first_half, _, _, local = task.train_partition(halves, catalog, partition, global_state, 1, task.LocalState())
    after_second_half, *_ = task.train_partition(halves, catalog, partition, after_first_half, 2, local)

    weight = "classifier.4.weight"
    assert not torch.allclose(after_first_half[weight], after_epoch[weight])  # half an epoch is not the epoch
    for key, value in after_epoch.items():
        assert torch.allclose(after_second_half[key].float(), value.float(), atol=1e-6), key
