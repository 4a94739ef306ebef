"""Typed configuration: one object, loaded from params.yaml, overridable from the CLI and flows.

Every stage receives a `Params` and writes the resolved copy next to its outputs (`params.yaml`),
so a run folder always says how it was produced.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from transferkit.core.errors import TransferkitError

Strategy = Literal["auto", "linear-probe", "partial", "full", "lp-ft", "scratch"]


class _Group(BaseModel):
    # .inf / .nan are valid YAML floats: refused for every field (an infinite LR passes gt=0)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info) -> Any:
        # pydantic's lax mode reads YAML's true/false as 1/0 for a number field (`epochs: true` = 1 epoch)
        if isinstance(v, bool):
            ann = cls.model_fields[info.field_name].annotation
            kinds = {ann, *get_args(ann)}
            if kinds & {int, float} and bool not in kinds:
                raise ValueError("must be a number, not true/false")
        return v


class DataParams(_Group):
    val_fraction: float = Field(0.2, gt=0, lt=1, description="split off train when val/ is missing")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="split off train when test/ is missing")
    # auto, as in params.yaml: a checkpoint trained here (zoo:, file:) at the side it was trained at (it lost
    # accuracy at other sides); packaged sources at one side, 192 (zoo.AUTO_SIZE: any feature ensemble of them
    # is valid; measured against 128 and the models' own sides in docs/stages.md)
    # hub models (any timm name) at their pretrained config's side, the scale their position embeddings and
    # features were learnt at (docs/backbones.md)
    image_size: int | Literal["auto"] | None = Field(
        "auto",
        description="auto = a trained checkpoint's own size, a hub model's pretrained size, else 192; "
        "null = the model's own size",
    )
    batch_size: int = Field(32, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)

    @field_validator("image_size", mode="before")
    @classmethod
    def _side(cls, v: Any) -> Any:  # one message, not one per branch of the union
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 1024):
            return v
        raise ValueError("must be a side in pixels from 16 to 1024, or auto/null (each model's own side)")


class DriftParams(_Group):
    model: str = "mobilenetv2_100"
    max_samples: int = Field(500, ge=10, description="larger sets are subsampled (seeded)")
    min_samples: int = Field(10, ge=5, description="fewer images on a side is refused")
    pca_components: int = Field(16, ge=2, le=512)
    stattest_threshold: float = Field(0.05, gt=0, lt=1)
    moderate_share: float = Field(0.25, gt=0, le=1, description="share of drifted statistics for moderate")
    severe_share: float = Field(0.5, gt=0, le=1, description="share of drifted statistics for severe")


class SelectParams(_Group):
    candidates: list[str] = [
        "mobilenetv2_100",
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
        "zoo:*",  # every source registered by `transferkit pretrain` (none: nothing)
        "pixels",  # the no-transfer control (scratch:ARCH, the random-init one, costs a forward pass: opt-in)
    ]
    # knn: its top 2 held the fine-tuned best most often in bench/results/select.md (what confirm: 2 needs)
    metric: Literal["logme", "leep", "knn", "probe"] = "knn"
    knn_k: int = Field(5, ge=1, le=100, description="neighbours of the leave-one-out kNN score")
    probe: bool = Field(True, description="also score a 3-fold cross-validated linear probe (logistic regression)")
    confirm: int = Field(
        5,
        ge=0,
        le=20,
        description="train the top K as train starts (its linear probe on the cached features: cheap), pick the "
        "best by val accuracy (0 = trust the score; no score ranked the candidates reliably on every benchmark "
        "target: docs/stages.md)",
    )
    ensemble: int = Field(
        2,
        ge=0,
        le=8,
        description="also score the top K pretrained candidates as one feature ensemble (SPEC+SPEC; 0/1 = off): "
        "an ensemble's probe can beat its best member's (docs/stages.md)",
    )
    confirm_epochs: int = Field(3, ge=1, le=100, description="epochs of each fine-tuning --confirm run")
    confirm_strategy: Literal["auto", "linear-probe", "full"] = Field(
        "auto",
        description="auto: train.search's first configuration when train searches (search_mode evidence/all), else the "
        "strategy train's rule picks for these labels (linear probes get train.epochs)",
    )
    runner: Literal["sequential", "thread", "dask"] = Field(
        "sequential", description="score candidates in-process, or in parallel via a Prefect task runner"
    )
    workers: int = Field(2, ge=1, le=256, description="parallel scorers (threads or Dask workers)")
    dask_address: str | None = Field(None, description="an existing Dask scheduler; null = a LocalCluster")


class TrainParams(_Group):
    strategy: Strategy = "auto"
    epochs: int = Field(20, ge=1, le=1000)
    lr: float = Field(1e-3, gt=0, description="fine-tuning LR: 10x smaller than scratch_lr")
    scratch_lr: float = Field(1e-2, gt=0)
    head_lr: float = Field(1e-2, gt=0, description="linear-probe head LR")
    weight_decay: float = Field(0.05, ge=0, description="AdamW (decoupled) weight decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    drop_rate: float = Field(0.2, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth in the residual blocks (fine-tuning)")
    patience: int = Field(5, ge=1, description="early stopping on validation loss")
    min_epochs: int = Field(
        20, ge=0, description="never stop before this epoch: val loss is noisy while the LR is high"
    )
    probe: Literal["lbfgs", "sgd"] = Field(
        "lbfgs",
        description="linear probe: lbfgs (logistic regression solved to its optimum, C on val) or sgd (AdamW "
        "head trained per epoch, early-stopped like a fine-tune)",
    )
    probe_c: list[PositiveFloat] = Field(
        [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], min_length=1, description="lbfgs probe: L2 strengths C tried on val"
    )
    self_training: Literal["auto", "off"] = Field(
        "off",
        description="lbfgs probe: pseudo-label the target's unlabelled/ pool (auto = when it has images; kept "
        "only if val improves). Off by default: it did not beat the plain probe beyond noise (docs/stages.md)",
    )
    class_weights: Literal["auto", "on", "off"] = Field(
        "auto",
        description="class-weighted loss and probe (balanced weights, transferkit.core.imbalance): auto = when the train "
        "label counts are skewed (max/min >= imbalance_ratio); the gate then judges balanced accuracy",
    )
    imbalance_ratio: float = Field(
        3.0, ge=1, description="train label counts with max/min at or above this are skewed (class_weights auto)"
    )
    augment: bool = True
    bn_stats: Literal["frozen", "update", "precise"] = Field(
        "precise",
        description="fine-tuning BatchNorm statistics: update (running average per batch), frozen (the source's), "
        "precise (re-estimated on the train images before each validation)",
    )
    linear_probe_max_per_class: int = Field(
        50, ge=1, description="auto: at or below this many labels per class, fine-tuning overfits"
    )
    unfreeze_blocks: int = Field(2, ge=1, description="partial: train the top K timm stages (+ head)")
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise LR decay (timm param_groups_layer_decay); null = off"
    )
    partial_min_params: float = Field(
        20.0, gt=0, description="auto: models with at least this many million parameters fine-tune partially"
    )
    adabn: Literal["auto", "on", "off"] = Field(
        "off", description="re-estimate BatchNorm statistics on target images (AdaBN); auto = when shift is detected"
    )
    adabn_max_images: int = Field(500, ge=8, description="AdaBN: target images used for the statistics")
    search_mode: Literal["evidence", "all", "rule"] = Field(
        "evidence",
        description="auto: evidence = the linear probe, then train.search's fine-tunes only when one can win (more "
        "than linear_probe_max_per_class labels per class, or the probe not above the no-transfer baselines on val "
        "beyond noise); all = every configuration of train.search; rule = the fixed rule, no search",
    )
    finetune_image_size: int | None = Field(
        128,
        ge=16,
        le=1024,
        description="auto search: the side its fine-tunes train at (null = data.image_size); the probe keeps the "
        "model's own side. A fine-tune pays for its side every epoch, the probe once (docs/stages.md)",
    )
    search: list[Literal["linear-probe", "partial", "full", "lp-ft"]] = Field(
        ["linear-probe", "full"], min_length=1, description="auto: configurations tried, cheapest first"
    )
    search_prune: float = Field(
        0.1, ge=0, le=1, description="auto: a fine-tune this far below the best val accuracy at half its epochs stops"
    )
    search_confidence: float = Field(
        0.8,
        ge=0,
        lt=1,
        description="auto: a later configuration replaces the kept one only when its paired val gain's interval "
        "at this level is above 0 (0 = any higher val accuracy)",
    )
    resume: bool = Field(True, description="resume a killed fine-tune from OUT/checkpoint.pt (same arguments)")
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=1024,
        description="fine-tune with DDP in this many torchrun processes (transferkit.train.distributed)",
    )

    @field_validator("adabn", "self_training", "class_weights", mode="before")
    @classmethod
    def _yaml_on_off(cls, v, info):
        # YAML 1.1 (and DVC rewriting params.yaml for `exp run -S`) reads off as false and on as true
        on = "auto" if info.field_name == "self_training" else "on"
        return {True: on, False: "off"}.get(v, v) if isinstance(v, bool) else v


class PixelGrid(_Group):
    """Hyper-parameters the raw-pixel baselines try on val (transferkit.models.baselines)."""

    logreg: list[float] = Field([0.1, 1.0, 10.0], min_length=1, description="logistic regression C")
    knn: list[int] = Field([1, 3, 5], min_length=1, description="neighbours")
    svm: list[float] = Field([1.0, 10.0, 100.0], min_length=1, description="RBF SVM C")


class ValidateParams(_Group):
    max_gap: float = Field(0.25, ge=0, le=1, description="train-val accuracy gap above this is overfit")
    require_gain: bool = Field(
        True, description="block unless the test gain over the best no-transfer baseline is significant"
    )
    min_gain: float = Field(
        0.0, ge=-1, le=1, description="the gain interval's lower bound must exceed this (test accuracy)"
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of the gain interval (McNemar at 1 - this)")
    no_transfer: list[Literal["pixels-logreg", "pixels-knn", "pixels-svm", "small-cnn", "scratch"]] = Field(
        ["pixels-logreg", "pixels-knn", "pixels-svm", "small-cnn"],
        description="no-transfer baselines trained on the same splits; scratch = the same architecture from random "
        "init (off by default: it costs a full training run, and it stays near chance with few labels per class)",
    )
    pixel_size: int = Field(32, ge=4, le=128, description="raw-pixel baselines: the native side, capped here")
    pixel_grid: PixelGrid = PixelGrid()
    cnn_epochs: int = Field(40, ge=1, le=1000, description="small-cnn: epochs per learning rate")
    cnn_lrs: list[float] = Field([0.01, 0.003], min_length=1, description="small-cnn: the LR sweep (best on val)")
    cnn_max_steps: int = Field(
        600, ge=1, description="small-cnn: optimizer steps per LR at most (bounds large targets)"
    )
    chance_alpha: float = Field(
        0.01, gt=0, lt=1, description="a baseline whose val accuracy is not above chance at this level is broken"
    )
    max_loss_gap: float = Field(
        1.0, ge=0, description="val loss - train loss (nats) at the best epoch above this is overfit"
    )
    max_test_val_gap: float = Field(
        0.1, ge=0, le=1, description="|test - val| accuracy above this is a selection-bias warning (non-blocking)"
    )
    require_match_linear_probe: bool = Field(
        True, description="a fine-tuned/scratch run must not lose to the linear probe with the same budget"
    )
    linear_probe_tolerance: float = Field(
        0.0, ge=0, le=1, description="test accuracy below the linear-probe baseline tolerated"
    )
    calibration_bins: int = Field(15, ge=2, le=100, description="equal-width confidence bins for ECE")


class ExportParams(_Group):
    name: str | None = Field(None, description="model name in the repository; default: target folder name")
    opset: int = Field(18, ge=13, le=23)
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript",
        description="torchscript (torch.onnx.export dynamo=False, the faster one) or dynamo (torch.export based, "
        "slower: docs/stages.md); the other is tried when the first fails, the parity gate checks both",
    )
    parity_atol: float = Field(1e-4, gt=0)
    min_top1_agreement: float = Field(0.999, ge=0, le=1)
    int8: bool = Field(
        False,
        description="also write model.int8.onnx (static QDQ), kept only within int8_max_drop; off by default: "
        "calibrating and checking it adds a large share to export's time (docs/stages.md)",
    )
    int8_max_drop: float = Field(
        0.01, ge=0, le=1, description="largest test-accuracy loss int8 may cost (0.01 = 1 point)"
    )
    int8_calibration_images: int = Field(
        300, ge=1, le=100_000, description="training images used to calibrate (seeded subsample)"
    )
    int8_activation: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type; U8S8 is the fast path on x86 CPUs without VNNI, S8S8 is ORT's default"
    )
    int8_reduce_range: bool = Field(
        True, description="7-bit weights: avoids VPMADDUBSW saturation on x86 CPUs without VNNI (AVX2)"
    )
    int8_fp32_resolution: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Conv nodes whose input feature map is at least this fraction of the image side stay float32 "
        "(0 = quantize every Conv); high-resolution int8 rounding noise dominates the accuracy loss",
    )
    check_images: int = Field(
        500,
        ge=0,
        le=1_000_000,
        description="parity and the int8-vs-fp32 accuracy run on at most this many test images (a seeded "
        "subsample, the same for both; 0 = all): each is a forward pass per image in two runtimes",
    )
    triton_max_batch_size: int = Field(32, ge=1, le=4096, description="config.pbtxt max_batch_size")
    triton_max_queue_delay_us: int = Field(100, ge=0, description="config.pbtxt dynamic_batching delay")


class SuggestParams(_Group):
    """Which unlabelled images to label next (transferkit.tools.suggest)."""

    n: int = Field(20, ge=1, le=100_000, description="how many pool images to suggest")
    strategy: Literal["uncertain-diverse", "uncertain", "diverse", "typical", "random"] = Field(
        "random",
        description="random by default: no ranking beat a seeded random draw beyond noise "
        "(docs/labels-and-imbalance.md). uncertain-diverse: small margin x distance to the labelled "
        "and earlier picks x predicted-class "
        "balance; uncertain: smallest margins; diverse: k-center greedy; typical: TypiClust (the most typical image of "
        "each large unlabelled k-means cluster); random: the seeded control",
    )
    balance: float = Field(
        1.0, ge=0, le=10, description="exponent of the predicted-minority bonus (0 = ignore class balance)"
    )


with warnings.catch_warnings():
    # `validate` shadows pydantic's deprecated BaseModel.validate; the group name is the DVC stage name.
    warnings.simplefilter("ignore", UserWarning)

    class Params(_Group):
        seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's seed range")
        data: DataParams = DataParams()
        drift: DriftParams = DriftParams()
        select: SelectParams = SelectParams()
        train: TrainParams = TrainParams()
        validate: ValidateParams = ValidateParams()
        export: ExportParams = ExportParams()
        suggest: SuggestParams = SuggestParams()


class ConfigError(TransferkitError, ValueError):
    """A params file or override that does not validate; the message names the field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a group")
    node[keys[-1]] = value


def load_params(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Read params.yaml (if given/present) and apply `key.sub=value` overrides (YAML-parsed values)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"params file not found: {p}")
        if p.stat().st_size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes; a params file may have at most {MAX_PARAMS_BYTES}")
        try:
            text = p.read_text()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        tree = _bounded_yaml(text, str(p)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in (overrides or [])]
    for key, value in items:
        _set_dotted(tree, key, value)
    return params_from(tree)


# Keys earlier versions wrote that no longer mean anything: dropped on reading, so that run folders, model
# metadata and params.yaml files written by them still load (a warning says so when a user sets one).
RETIRED = {
    ("train", "budget_minutes"): "the search is bounded by epochs, not by a clock (train.search_mode)",
}


def params_from(tree: dict[str, Any] | None) -> Params:
    """Params from a plain dict (a resolved copy, a flow parameter); ConfigError naming each bad field."""
    import warnings

    tree = dict(tree or {})
    for (group, key), why in RETIRED.items():
        if isinstance(tree.get(group), dict) and key in tree[group]:
            tree[group] = {k: v for k, v in tree[group].items() if k != key}
            warnings.warn(f"params field '{group}.{key}' is ignored: {why}", FutureWarning, stacklevel=2)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"])
            lines.append(f"params field {field!r}: {err['msg']} (got {_short(err.get('input'))})")
        raise ConfigError("; ".join(lines)) from None


MAX_PARAMS_BYTES = 1 << 20  # params.yaml is a few kB; a larger file is a mistake or an attack
MAX_YAML_NODES = 100_000  # scalars + collections after alias expansion (an alias bomb expands to billions)
MAX_YAML_DEPTH = 32
MAX_OVERRIDE_CHARS = 10_000


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value for a one-line message, bounded (the value may be large)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 6, 6, 3
    return r.repr(value)[: limit + 20]


def _bounded_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with the expanded size and nesting depth bounded before anything is constructed:
    PyYAML's composer builds each node once however often aliases reuse it, so the expanded node count is
    counted over the composed graph (memoised per node) and a billion-laughs file costs microseconds."""
    try:
        depth = 0
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):  # events, iteratively: depth before composing
            if isinstance(ev, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(
                        f"{where}: nested more than {MAX_YAML_DEPTH} levels (line {ev.start_mark.line + 1})"
                    )
            elif isinstance(ev, yaml.CollectionEndEvent):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_one_line(e)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels") from None
    if node is None:
        return None
    sizes: dict[int, int] = {}

    def size(n, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels (line {n.start_mark.line + 1})")
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = MAX_YAML_NODES + 1  # a node reached again while being sized is a cycle: too big
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v, depth + 1) for v in n.value)
        else:
            total = 1
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: expands to more than {MAX_YAML_NODES} values (aliases of aliases?) "
                f"at line {n.start_mark.line + 1}"
            )
        sizes[id(n)] = total
        return total

    size(node, 0)
    try:
        return yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).replace('in "<unicode string>", ', "").split())[:300]


def _split(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ConfigError(f"override {_short(override)} must look like group.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {key!r}: value of {len(raw)} characters; at most {MAX_OVERRIDE_CHARS}")
    if not raw.strip():
        return key, None
    return key, _bounded_yaml(raw, f"override {key!r}")


def default_params_path() -> Path | None:
    """params.yaml in the current directory, the DVC convention."""
    p = Path("params.yaml")
    return p if p.is_file() else None


def dump_params(params: Params, path: Path) -> None:
    from transferkit.core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
