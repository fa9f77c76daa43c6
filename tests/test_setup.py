"""A set-up built from given weights trains exactly as one built, initialised, then loaded."""

from __future__ import annotations

import torch

from fedbt.config import ExperimentConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.model.architectures import build_model
from fedbt.model.device import prepare_model
from fedbt.train.setup import new_model, train_epoch, training_setup


def test_a_model_from_given_weights_trains_as_one_initialised_then_loaded(data_config):
    cfg = ExperimentConfig(data=data_config)
    cfg.train = TrainConfig(batch_size=8, threads=1, log_every=0, device="cpu")
    catalog = build_catalog(cfg.data, progress=False)
    classes = catalog.task.num_classes
    torch.manual_seed(7)  # weights other than the seed's own, as a round's global model is
    given = build_model(cfg.model, classes, cfg.data.image_size).state_dict()
    dataset = catalog.dataset(split="train", pooled=True)

    from_state = training_setup(cfg, classes, initial_state=given)
    assert all(torch.equal(from_state.model.state_dict()[k], v) for k, v in given.items())
    initialised = training_setup(cfg, classes)
    initialised.model.load_state_dict(given)
    for setup in (from_state, initialised):
        train_epoch(setup, dataset, cfg, None, seed=3, loader_seed=3, batches=range(2))
    trained = from_state.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in initialised.model.state_dict().items())
    assert not torch.equal(trained["fc.weight"], given["fc.weight"])  # it did train


def test_the_untrained_model_is_the_seeds_own(data_config):
    cfg = ExperimentConfig(data=data_config)
    first, second = new_model(cfg, 4), prepare_model(new_model(cfg, 4), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
