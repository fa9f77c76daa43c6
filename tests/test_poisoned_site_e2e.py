"""End to end: one poisoned site of three in a real Flower simulation on generated data.

The poisoned site (br35h) trains honestly, then spoils its reply in a different way each
round. Every round must complete with the reason logged and recorded, the global model must
stay finite, and with reply validation plus FedMedian the final model must score within 2
points of a clean run's on the pooled validation split.
"""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.clientapp import ClientApp

from fedbt.cli import config_from_args
from fedbt.federated import client_app as sites
from fedbt.federated.packing import METRICS_RECORD, SITE_RECORD, packing_mod
from fedbt.federated.simulation import run_flower_simulation
from fedbt.fl.protocol import EXAMPLES_KEY, MODEL, ROUND_KEY, SITE_NAME_KEY
from fedbt.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e
POISONED = "br35h"
# Round -> how the poisoned site spoils its reply, and the reason the server must give.
ATTACKS = {
    1: ("nan", "holds NaN or infinite values"),
    2: ("huge-count", "num-examples 1000000000 is more than the site's"),
    3: ("wrong-shape", "has shape"),
    4: ("missing-key", "weights differ from the global model's"),
    5: ("other-name", "claims the name of another site ('figshare')"),
    6: ("scaled", "more than 10 times the median of the others'"),
}

# The site's own mod: the server packs its messages, and the spoiling is done on the unpacked reply.
poisoned_app = ClientApp(mods=[packing_mod])


def spoil(reply: Message, attack: str, global_state: dict) -> None:
    state = reply.content[MODEL].to_torch_state_dict()
    head = [k for k, v in state.items() if v.dim() == 2][-1]  # the classifier's weight matrix
    if attack == "nan":
        state[head] = torch.full_like(state[head], math.nan)
    elif attack == "huge-count":
        reply.content[METRICS_RECORD][EXAMPLES_KEY] = 10**9
    elif attack == "wrong-shape":
        state[head] = state[head].T.contiguous()
    elif attack == "missing-key":
        state.pop(head)
    elif attack == "other-name":
        reply.content[SITE_RECORD] = ConfigRecord({SITE_NAME_KEY: "figshare"})
    elif attack == "scaled":
        state = {
            k: g + 100 * (v - g) if v.is_floating_point() else v
            for (k, v), g in zip(state.items(), global_state.values())
        }
    reply.content[MODEL] = ArrayRecord(torch_state_dict=state)


@poisoned_app.train()
def train(msg: Message, context) -> Message:
    global_state = msg.content[MODEL].to_torch_state_dict()
    reply = sites.train(msg, context)
    if str(reply.content[SITE_RECORD][SITE_NAME_KEY]) == POISONED:
        spoil(reply, ATTACKS[int(msg.content["config"][ROUND_KEY])][0], global_state)
    return reply


@poisoned_app.evaluate()
def evaluate(msg: Message, context) -> Message:
    return sites.evaluate(msg, context)


def run(demo_args, out, client_app=None) -> dict:
    # Batches of 32 at lr 0.001: with the demo profile's 16 at 0.002 the small CNN barely moves on
    # this tiny data, and an honest site's update then looks outsized next to the others'.
    args = ["--out", str(out), "--set", "federated.strategy=fedmedian", "--set", "federated.rounds=6",
            "--set", "federated.max_update_ratio=10", "--set", "federated.min_clients=2",
            "--set", "model.name=cnn", "--set", "train.batch_size=32", "--set", "train.lr=0.001"]  # fmt: skip
    from fedbt.cli import build_parser

    cfg = config_from_args(build_parser().parse_args(["simulate", *demo_args, *args]))
    out.mkdir(parents=True)
    return run_flower_simulation(cfg, out, client_app)


def test_one_poisoned_site_cannot_break_the_federation(demo_args, tmp_path):
    clean = run(demo_args, tmp_path / "clean")
    poisoned = run(demo_args, tmp_path / "poisoned", poisoned_app)
    history = poisoned["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4, 5, 6]  # every round completed
    for entry in history:
        attack, reason = ATTACKS[entry["round"]]
        assert set(entry["train"]) == {"figshare", "sartaj"}, attack  # the poisoned reply was not aggregated
        ((who, why),) = entry["dropped"].items()
        # Logged with its reason, and never blamed on an honest site (a node not yet bound to a name
        # is named by its id and the name it claimed).
        assert reason in why and who not in ("figshare", "sartaj"), (attack, entry["dropped"])
    for name in ("last.pt", "final.pt"):
        state = load_checkpoint(tmp_path / "poisoned" / "federated" / name)["model_state"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    clean_accuracy = clean["history"][-1]["server"]["accuracy"]
    poisoned_accuracy = history[-1]["server"]["accuracy"]
    assert abs(poisoned_accuracy - clean_accuracy) <= 0.02, (clean_accuracy, poisoned_accuracy)
    assert json.loads(json.dumps(poisoned))  # the results are plain JSON
