"""Experiment configuration: validated dataclasses, YAML defaults, command-line overrides.

Layering follows timm: dataclass defaults < YAML file(s) < ``--set key=value``
overrides (dotted keys such as ``train.epochs=3``) < explicit CLI flags.
Every layer is validated as it is applied (pydantic: types coerced, ranges and names
checked, unknown keys refused), so an error names the file or override it came from.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.dataclasses import dataclass

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SITES = ["sites/figshare.yaml", "sites/sartaj.yaml", "sites/br35h.yaml"]

# Unknown keys are refused, assignments (cfg.train.lr = ...) are checked like file values,
# and a number given for a name or path (name: 2024) is taken as its text.
STRICT_FIELDS = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
# Validation context while settings are applied layer by layer: rules between sections wait
# for the last layer, since a later layer may complete what an earlier one started
# (privacy.enabled in a file, model.norm=group in --set).
PARTIAL = {"partial": True}

# Who decides a setting, declared on the field itself (`scoped`) or, for the fields that say
# nothing, by its section (SECTION_SCOPES):
# - SERVER: a federation's server may set it for the sites (training hyper-parameters);
# - SITE: the site's own (where its data is and how it is split, which files it reads);
# - RUNTIME: where or how fast a run goes on this machine, never its result: a site's own
#   too, and left out of what decides whether an earlier baseline can be reused.
SERVER, SITE, RUNTIME = "server", "site", "runtime"
SECTION_SCOPES = {
    "data": SITE,
    "model": SERVER,
    "train": SERVER,
    "federated": SERVER,
    "privacy": SERVER,
    "personalise": SERVER,  # how each site adapts the final model, when the server asks it to
}


def scoped(scope: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field whose scope differs from its section's (see SECTION_SCOPES)."""
    return field(default=default, metadata={"scope": scope}, **kwargs)


StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "fedexp",
    "fednova",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "scaffold",
]
STRATEGY_NAMES = list(get_args(StrategyName))
# The strategies whose aggregate is the average that client-level DP's noise is calibrated to.
CLIENT_PRIVACY_STRATEGIES = ("fedavg", "fedprox")


class ConfigError(ValueError):
    """A setting or settings file a user got wrong; the message is one line naming where."""


@dataclass(config=STRICT_FIELDS)
class DataConfig:
    # Root that relative site paths resolve against. None: generated demo data.
    data_root: str | None = None
    sites: Annotated[list[str], Field(min_length=1)] = field(default_factory=lambda: list(DEFAULT_SITES))
    task: Literal["4class", "binary"] = scoped(SERVER, "4class")
    image_size: PositiveInt = scoped(SERVER, 128)
    # Crop the black frame around the head and pad to square before resizing. Off by
    # default: it cost 3.5 points of pooled test accuracy in the measured central run.
    crop_to_content: bool = scoped(SERVER, False)
    cache_dir: str = scoped(
        RUNTIME, default_factory=lambda: os.environ.get("FEDBT_CACHE", str(Path.home() / ".cache" / "fedbt"))
    )
    # Two images whose 256-bit difference hashes differ in at most this many bits
    # are treated as the same picture (re-encoded, resized, re-saved); -1 turns it off.
    near_duplicate_bits: Annotated[int, Field(ge=-1, le=256)] = 10
    # Files are checked before they are decoded: a header claiming more pixels (width x height)
    # than this is refused unread (20000 x 20000 would take ~3 GB to decode), and so is an image
    # smaller than min_image_side on a side (scaled up from a few pixels, it shows nothing).
    # The real sites' images are 150 to 1365 px a side.
    max_image_pixels: PositiveInt = 4096 * 4096
    min_image_side: PositiveInt = 32
    # Keep at most this many images per site (per source label): small real-data slices.
    max_per_label: PositiveInt | None = None
    seed: NonNegativeInt = 0


@dataclass(config=STRICT_FIELDS)
class ModelConfig:
    name: Literal["resnet18", "cnn", "resnet50"] = "resnet18"
    in_channels: PositiveInt = 1
    # Local file of ImageNet weights (resnet50 transfer learning only); never downloaded.
    pretrained_path: str | None = scoped(SITE, None)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5
    # ResNet18's normalisation layers. GroupNorm normalises each image on its own, which
    # per-sample gradients (differential privacy) need; BatchNorm mixes the images of a batch.
    norm: Literal["batch", "group"] = "batch"

    @model_validator(mode="after")
    def _norm_for_resnet18_only(self) -> ModelConfig:
        if self.norm == "group" and self.name != "resnet18":
            raise ValueError(f"norm 'group' is for resnet18 only (the {self.name} model has its own layers)")
        return self


@dataclass(config=STRICT_FIELDS)
class TrainConfig:
    epochs: PositiveInt = 12
    batch_size: PositiveInt = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    schedule: Literal["onecycle", "cosine", "plateau", "constant"] = "onecycle"
    class_weights: bool = False
    augment: bool = True
    # Random brightness/contrast change (fraction) on top of flips and small affine moves.
    intensity_jitter: Fraction = 0.2
    # Where augmentation runs: per item in the loader, or on whole batches on the training
    # device. auto: on the device for CUDA (host-side per-item work would starve the GPU),
    # in the loader on CPU (there it is ~1% of a step).
    augment_on: Literal["auto", "loader", "device"] = scoped(SITE, "auto")
    # Weight of a uniform target mixed into the coarse-label loss. 0.1 in the CPU and GPU
    # profiles: central pooled test accuracy 95.7% (mean of 8 training seeds) vs 94.9% (6) without.
    label_smoothing: Fraction = 0.0
    # Seed of initialisation, batch order and augmentation; None: data.seed. Apart from
    # data.seed it changes the training run alone, never the split.
    seed: NonNegativeInt | None = None
    early_stopping_patience: PositiveInt | None = None
    # Transfer learning: epochs with a frozen backbone before layer4 is unfrozen.
    freeze_backbone_epochs: NonNegativeInt = 0
    finetune_lr_factor: PositiveFloat = 0.1
    device: Literal["auto", "cpu", "cuda"] = scoped(RUNTIME, "auto")
    num_workers: NonNegativeInt | None = scoped(RUNTIME, None)  # None: 0 (items are in memory; see data/loader.py)
    threads: PositiveInt | None = scoped(RUNTIME, None)  # torch CPU threads; None: all cores
    log_every: NonNegativeInt = scoped(RUNTIME, 20)  # batches between progress lines; 0: none


@dataclass(config=STRICT_FIELDS)
class FederatedConfig:
    num_clients: PositiveInt = 3
    rounds: PositiveInt = 12
    # Passes over the site's training split per round. A fraction 1/k (0.5, 0.25) splits each
    # local epoch over k rounds: the sites are averaged k times as often for the same budget.
    local_epochs: PositiveInt | PositiveFloat = 1
    # fedmedian, fedtrimmedavg and krum resist a site sending outsized or crafted weights (docs/robustness.md).
    # scaffold corrects each site's drift with control variates (SCAFFOLD) and averages as fedavg does.
    # fedexp averages as fedavg does, then steps further along the average the more the sites disagree.
    # fednova averages the sites' updates per local step, so a site counts by its data, not its data squared.
    strategy: StrategyName = "fedavg"
    # fedtrimmedavg: share of the sites' values cut at each end of every weight before averaging.
    # Flower's default 0.2 cuts nothing with 3 sites (int(0.2 * 3) = 0); 0.34 cuts one at each end.
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.34
    # krum: how many of the sites may be malicious (Krum needs more than 2 * this + 2 sites).
    krum_malicious: NonNegativeInt = 0
    # Drop a site's update that is more than this many times the median of the others' (None: no bound).
    max_update_ratio: Annotated[float, Field(gt=1)] | None = None
    proximal_mu: NonNegativeFloat = 0.0
    fedbn: bool = False
    # Server learning rate of fedadam, fedyogi (eta) and fedavgm (server_learning_rate); None: Flower's
    # own default for the strategy (fedadam 0.1, fedyogi 0.01, fedavgm 1.0). They step the trainable
    # parameters only (BatchNorm statistics are averaged); the old fixed 1.0 made FedAdam's first step
    # move every weight by about 0.7, ten times Flower's.
    server_lr: PositiveFloat | None = None
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Share of the connected sites asked to train each round.
    fraction_train: Annotated[float, Field(gt=0, le=1)] = 1.0
    min_clients: PositiveInt | None = None  # None: every client
    partition: Literal["origin", "iid", "dirichlet"] = "origin"
    dirichlet_alpha: PositiveFloat = 0.5
    # Keep each client's Adam state between rounds (in the client's own state) instead of a
    # fresh Adam every round, whose first steps jolt the weights. On the real data, CPU
    # profile: federated 93.6% vs central 95.4% pooled 4-class test accuracy (README).
    keep_optimizer_state: bool = True
    # Restricted softmax (FedRS): a client normalises its loss over the classes it has.
    restricted_softmax: bool = False
    # Score the global model (pooled validation on the server, each site's validation split
    # on the clients) every this many rounds and after the last; checkpoints are written every
    # round regardless. The sites score round k's model on round k+1's training message, before
    # training on it. On the CPU profile scoring takes about 5 s of a ~70 s round.
    evaluate_every: PositiveInt = 1
    # Precision of the weights on the wire: float16 halves the ~45 MB a ResNet18 costs per
    # site per round each way. The server keeps and aggregates its copy in float32. (No
    # bfloat16: Flower's arrays are numpy arrays, and numpy has no bfloat16.)
    transport_dtype: Literal["float32", "float16"] = "float32"
    # Ray cluster to join ("auto" or host:port) so a simulation spans machines; None: local.
    ray_address: str | None = None
    # A simulation on a GPU: how many clients train on one GPU at once (each asks Ray for that
    # share of it, and of the cores); None: all of them. Lower it when that many models and
    # batches do not fit in the GPU's memory together. Ignored without CUDA.
    clients_per_gpu: PositiveInt | None = None
    # Seconds the server waits for a round's replies before going on with those it has, and
    # for the minimum number of sites to be connected before it stops the run.
    round_timeout: PositiveFloat = 3600.0
    # Seconds between the server's checks for replies (Flower's deployment Grid waits 3 s).
    poll_interval: PositiveFloat = 0.2
    resume: bool = False

    @field_validator("local_epochs")
    @classmethod
    def _whole_epochs_or_one_kth(cls, value: float) -> int | float:
        if float(value).is_integer():
            return int(value)
        k = round(1 / value)
        if value > 1 or abs(k * value - 1) > 1e-9:
            raise ValueError(f"must be a whole number of epochs or one k-th of an epoch (0.5, 0.25), got {value}")
        return value

    @property
    def total_epochs(self) -> int:
        """Passes over every site's training split in the whole run: the central and local-only budget."""
        return round(self.rounds * self.local_epochs)

    @field_validator("transport_dtype", mode="before")
    @classmethod
    def _explain_bfloat16(cls, value: Any) -> Any:
        if value == "bfloat16":
            raise ValueError("bfloat16 cannot be sent: Flower's arrays are numpy arrays and numpy has no bfloat16")
        return value


@dataclass(config=STRICT_FIELDS)
class ClientPrivacyConfig:
    """Client-level differential privacy (Flower's fixed-clipping wrapper): each site's whole update
    is clipped and the average of the updates noised, so the unit protected is a site, not an image."""

    enabled: bool = False
    # Each site's update (its trained parameters minus the global ones) is clipped to this L2 norm.
    clipping_norm: PositiveFloat = 1.0
    # Noise standard deviation on the sum of the clipped updates, in units of clipping_norm.
    # 0 only for checking the arithmetic: it protects nothing (epsilon is infinite).
    noise_multiplier: NonNegativeFloat = 1.0
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # server: the server clips each update it receives. client: each site clips its own update
    # before sending it (Flower's fixedclipping_mod), so no unclipped update leaves a site.
    clipped_at: Literal["server", "client"] = "server"


@dataclass(config=STRICT_FIELDS)
class PrivacyConfig:
    """Record-level differential privacy (DP-SGD) at every trainer: each site, or the central run."""

    enabled: bool = False
    # The (epsilon, delta) each site may spend over the whole run; a site stops training
    # when one more step would spend more.
    target_epsilon: PositiveFloat = 8.0
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # Each image's gradient is clipped to this L2 norm before the batch's are summed and noised.
    max_grad_norm: PositiveFloat = 1.0
    # None: the noise that spends exactly the target over the planned run (rounds x local
    # epochs, or the central epochs). A number: this noise, and training stops when spent.
    noise_multiplier: PositiveFloat | None = None
    # Opacus's accountant: Renyi DP (conservative, fast) or PRV (tighter, slower).
    accountant: Literal["rdp", "prv"] = "rdp"
    # The other option, for federations of many sites (docs/privacy.md): not combined with the above.
    client_level: ClientPrivacyConfig = field(default_factory=ClientPrivacyConfig)


@dataclass(config=STRICT_FIELDS)
class TrackingConfig:
    # Log the run to MLflow (docs/tracking.md); FEDBT_TRACKING=off switches it off as well.
    enabled: bool = True
    # Tracking server or store; None: $MLFLOW_TRACKING_URI, else the embedded store results/mlflow.db.
    uri: str | None = None
    # A run to log this one under (a seed study, a sweep): created by its name on first use, then found by it.
    parent: Annotated[str, Field(pattern=r"^[^'\"]+$")] | None = None
    # The run this one is logged under: fedbt simulate sets it for its federated, central and local-only runs.
    parent_run_id: str | None = None


@dataclass(config=STRICT_FIELDS)
class PersonaliseConfig:
    """After the last round each site adapts the final global model on its own training split and keeps
    the adaptation only when it scores higher on its own validation split (fedbt/train/personalise.py)."""

    # On by default in simulation: the report then shows, per site, local-only, global and personalised.
    enabled: bool = True
    # What is tried, each from the global model: 'batchnorm' re-estimates the BatchNorm statistics on the
    # site's images, 'head' trains the last layer (ResNet's fc), 'all' trains every layer at a lower LR;
    # and 'local', the site's own local-only model where it has one (in simulation, unless --skip-local).
    candidates: Annotated[list[Literal["batchnorm", "head", "all", "local"]], Field(min_length=1)] = field(
        default_factory=lambda: ["batchnorm", "head", "all", "local"]
    )
    # Passes over the site's training split for 'head' and for 'all' (each), against the run's rounds x local epochs.
    epochs: PositiveInt = 1
    # Peak LR of 'all' as a share of train.lr: low, so the model adapts without forgetting the federation's.
    lr_factor: PositiveFloat = 0.1


@dataclass(config=STRICT_FIELDS)
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    personalise: PersonaliseConfig = field(default_factory=PersonaliseConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _rounds_hold_whole_epochs(self, info: ValidationInfo) -> ExperimentConfig:
        """The central and local-only runs train the same number of epochs, which must be whole."""
        fc = self.federated
        if info.context != PARTIAL and abs(fc.rounds * fc.local_epochs - fc.total_epochs) > 1e-9:
            per_epoch = round(1 / fc.local_epochs)
            raise ValueError(
                f"federated.rounds x federated.local_epochs must be a whole number of epochs (the central "
                f"run's budget), got {fc.rounds} x {fc.local_epochs}: with {per_epoch} rounds an epoch, "
                f"make rounds a multiple of {per_epoch}, or set --local-epochs 1"
            )
        return self

    @model_validator(mode="after")
    def _private_training_is_per_sample(self, info: ValidationInfo) -> ExperimentConfig:
        """DP-SGD bounds each image's own gradient: nothing may mix the images of a batch."""
        if not self.privacy.enabled or info.context == PARTIAL:
            return self
        has_batchnorm = self.model.name == "resnet50" or (self.model.name == "resnet18" and self.model.norm == "batch")
        if has_batchnorm:
            raise ValueError(
                "privacy.enabled needs a model without BatchNorm, which mixes the images of a batch: "
                "model.name=resnet18 with model.norm=group, or model.name=cnn"
            )
        if self.train.class_weights:
            raise ValueError(
                "privacy.enabled cannot use train.class_weights: the loss divides by the batch's total weight, "
                "so one image's gradient would depend on the others"
            )
        if self.federated.restricted_softmax:
            raise ValueError(
                "privacy.enabled cannot use federated.restricted_softmax: which classes a site has is read "
                "from its records without noise, and one record can decide it"
            )
        if self.federated.strategy == "fedprox" and self.federated.proximal_mu > 0:
            raise ValueError(
                "privacy.enabled cannot use FedProx's proximal term: Opacus noises per-sample gradients "
                "and would drop the term's gradient"
            )
        return self

    @model_validator(mode="after")
    def _client_level_privacy_averages(self, info: ValidationInfo) -> ExperimentConfig:
        """Flower's noise is calibrated to a plain average of clipped updates, and to one mechanism."""
        if not self.privacy.client_level.enabled or info.context == PARTIAL:
            return self
        if self.privacy.enabled:
            raise ValueError(
                "privacy.client_level.enabled and privacy.enabled are two options, not one run: "
                "client-level DP protects a site, record-level DP each image (docs/privacy.md)"
            )
        if self.federated.strategy not in CLIENT_PRIVACY_STRATEGIES:
            raise ValueError(
                f"privacy.client_level needs federated.strategy fedavg or fedprox, not {self.federated.strategy}: "
                "its noise is calibrated to a plain average of the clipped updates"
            )
        return self

    @model_validator(mode="after")
    def _scaffold_corrects_plain_gradients(self, info: ValidationInfo) -> ExperimentConfig:
        """SCAFFOLD adds c - c_i to every gradient of every trainable parameter, and sends the mean gradient."""
        if self.federated.strategy != "scaffold" or info.context == PARTIAL:
            return self
        if self.privacy.enabled:
            raise ValueError(
                "federated.strategy scaffold cannot use privacy.enabled: DP-SGD replaces each gradient with a "
                "clipped, noised sum the correction cannot reach, and the site's mean gradient would leave it unnoised"
            )
        if self.federated.fedbn:
            raise ValueError(
                "federated.strategy scaffold cannot use federated.fedbn: the BatchNorm weights it keeps at each "
                "site have no global value for a control variate to correct towards"
            )
        return self

    @property
    def training_seed(self) -> int:
        return self.data.seed if self.train.seed is None else self.train.seed


def _fields_of(schema: Any, loc: tuple[Any, ...]) -> list[str]:
    """Names of the settings the pydantic class reached from `schema` along `loc` accepts."""
    for key in loc:
        schema = schema.__pydantic_fields__[key].annotation
    return list(schema.__pydantic_fields__)


def _describe(error: dict[str, Any], schema: Any) -> str:
    loc = tuple(error["loc"])
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = ".".join(map(str, loc[:-1]))
        valid = f" (valid: {', '.join(_fields_of(schema, loc[:-1]))})" if schema is not None else ""
        return f"{parent + ': ' if parent else ''}unknown setting {loc[-1]!r}{valid}"
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if error["type"] != "missing" and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return f"{'.'.join(map(str, loc))}: {message}" if loc else message


def describe_validation_error(err: ValidationError, where: str, schema: Any = None) -> str:
    """One line for a pydantic error: where, then each problem as dotted.key: what.
    Given the validated class, an unknown key's message lists the valid ones."""
    return f"{where}: " + "; ".join(_describe(error, schema) for error in err.errors())


def validated(schema: Any, values: Any, where: str, context: dict | None = None) -> Any:
    """`values` as an instance of the pydantic class `schema`; ConfigError naming `where` otherwise."""
    try:
        return TypeAdapter(schema).validate_python(values, context=context)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where, schema)) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"invalid YAML{where}: {problem}".split())


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: {_yaml_problem(err)}") from None


def read_yaml_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); ConfigError naming the file otherwise."""
    resolved = resolve_project_path(path)
    if not resolved.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        text = resolved.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    values = parse_yaml(text, str(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, not {type(values).__name__}")
    return values


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merged(merged[key], value)
        merged[key] = value
    return merged


def _parse_override(text: str) -> dict[str, Any]:
    """'train.lr=1e-4' -> {'train': {'lr': '1e-4'}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: not of the form section.key=value")
    key, raw = text.split("=", 1)
    nested = parse_yaml(raw, f"--set {text}")
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(
    paths: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    final: bool = True,
    origins: dict[str, str] | None = None,
) -> ExperimentConfig:
    """Build a config from defaults, then each YAML file in order, then overrides; validated whole
    at the end (final=False: each layer alone, the rules between sections not yet applied).
    origins: what the user typed for an override that came from a command-line flag."""
    values: dict[str, Any] = {}
    cfg = ExperimentConfig()
    for path in paths or []:
        values = _merged(values, read_yaml_mapping(path, "config"))
        cfg = validated(ExperimentConfig, values, str(path), PARTIAL)
    for text in overrides or []:
        values = _merged(values, _parse_override(text))
        cfg = validated(ExperimentConfig, values, (origins or {}).get(text, f"--set {text}"), PARTIAL)
    return validated(ExperimentConfig, values, "settings") if values and final else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _scopes(schema: Any, prefix: str, inherited: str) -> dict[str, str]:
    found = {}
    for item in dataclasses.fields(schema):
        scope = item.metadata.get("scope") or SECTION_SCOPES.get(prefix + item.name, inherited)
        if dataclasses.is_dataclass(item.type) or (isinstance(item.type, str) and item.type.endswith("Config")):
            nested = schema.__pydantic_fields__[item.name].annotation
            found.update(_scopes(nested, f"{prefix}{item.name}.", scope))
        else:
            found[prefix + item.name] = scope
    return found


# Every dotted setting and who decides it.
SCOPES: dict[str, str] = {}


def scope_of(key: str) -> str | None:
    """SERVER, SITE or RUNTIME for a dotted setting; None for one that does not exist."""
    if not SCOPES:
        SCOPES.update(_scopes(ExperimentConfig, "", SITE))
    return SCOPES.get(key)


def keys_in_scope(scope: str) -> list[str]:
    scope_of("name")
    return [key for key, value in SCOPES.items() if value == scope]


def _known_only(schema: Any, values: dict[str, Any]) -> dict[str, Any]:
    fields = schema.__pydantic_fields__
    known = {}
    for key, value in values.items():
        if key not in fields:
            continue
        nested = fields[key].annotation
        if isinstance(value, dict) and dataclasses.is_dataclass(nested):
            value = _known_only(nested, value)
        known[key] = value
    return known


def from_dict(values: dict[str, Any], strict: bool = True) -> ExperimentConfig:
    """strict=False drops settings this version does not know (a checkpoint's older config)."""
    if not strict:
        values = _known_only(ExperimentConfig, values)
    return validated(ExperimentConfig, values, "config")


def resolve_project_path(path: str | Path) -> Path:
    """Site and config paths may be given relative to the project root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path
