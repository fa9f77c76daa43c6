"""The site decides: the experiment a server sends, checked against the site's policy.

A server may set the training hyper-parameters (the settings fedbt.config scopes SERVER), within the limits
of the site's policy (fedbt.data.sites.SitePolicy). Every other setting is the site's own:
its data root, site file, cache folder and split seed are pinned, the rest keep this
version's defaults. A server asking for another value of one of them, or for more than a
limit allows, is refused with every reason; a deployment server sends the settable part
alone (`settable_part`), so an honest run is never refused. Flower-free, like task.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedbt.config import (
    SERVER,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    from_dict,
    scope_of,
    to_dict,
)
from fedbt.data.sites import SitePolicy, SiteSpec


def settable(key: str) -> bool:
    """Whether a server may set this dotted setting (declared on the field: fedbt.config's scopes)."""
    return scope_of(key) == SERVER


class PolicyRefusal(ValueError):
    """The server asked a site for what its policy does not allow; the message says what, for the site's log."""


@dataclasses.dataclass(frozen=True)
class SiteSetup:
    """What the SuperNode was started with: its site file (and the site it describes), data root and cache."""

    site_file: str
    site: SiteSpec
    data_root: str | None = None
    cache_dir: str | None = None

    @property
    def policy(self) -> SitePolicy:
        return self.site.policy

    def own_experiment(self) -> ExperimentConfig:
        """The site's own settings: its data pinned, everything else this version's defaults."""
        data = DataConfig(sites=[self.site_file], data_root=self.data_root, seed=self.policy.split_seed)
        cache_dir = self.cache_dir or self.policy.cache_dir
        if cache_dir:
            data.cache_dir = str(Path(cache_dir).expanduser())
        model = ModelConfig(pretrained_path=self.policy.pretrained_path)
        return ExperimentConfig(data=data, model=model)


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'seed': 1}} -> {'data.seed': 1}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nested(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        target = out
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return out


def settable_part(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a server sends a site that holds its own data: the settings it may set, nothing else."""
    return nested({key: value for key, value in flat(to_dict(cfg)).items() if settable(key)})


def limit_problems(cfg: ExperimentConfig, policy: SitePolicy) -> list[str]:
    limits = (
        ("data.image_size", cfg.data.image_size, policy.max_image_size),
        ("train.batch_size", cfg.train.batch_size, policy.max_batch_size),
        ("federated.local_epochs", cfg.federated.local_epochs, policy.max_local_epochs),
        # Personalisation trains at the site too: no more passes over its data than a round may take.
        ("personalise.epochs", cfg.personalise.epochs, policy.max_local_epochs),
    )
    return [f"{key}={value} is above this site's limit of {limit}" for key, value, limit in limits if value > limit]


def site_experiment(sent: dict[str, Any], setup: SiteSetup) -> ExperimentConfig:
    """The experiment this site runs: its own settings with the server's settable ones on top.

    PolicyRefusal naming every setting the server may not ask for, and every limit it exceeds.
    """
    own = flat(to_dict(setup.own_experiment()))
    asked = flat(sent) if isinstance(sent, dict) else {"experiment": sent}
    problems = [
        f"the server asked for {key}={value!r}, which this site decides ({own[key]!r})"
        if key in own
        else f"the server sent an unknown setting {key!r}"
        for key, value in asked.items()
        if not settable(key) and own.get(key, object()) != value
    ]
    if problems:
        raise PolicyRefusal("; ".join(problems))
    try:
        cfg = from_dict(nested({**own, **asked}))
    except ConfigError as err:
        raise PolicyRefusal(f"the server's experiment is not valid: {err}") from None
    if problems := limit_problems(cfg, setup.policy):
        raise PolicyRefusal("; ".join(problems))
    return cfg
