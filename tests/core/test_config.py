"""Unit tests for transferkit.core.config: params.yaml, overrides, validation errors, round trip.

.venv/bin/pytest -q tests/core/test_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferkit.core.config import ConfigError, Params, dump_params, load_params

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def params_file(tmp_path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(
        "seed: 5\n"
        "data:\n  image_size: 64\n  batch_size: 16\n"
        "train:\n  epochs: 7\n  lr: 0.01\n  strategy: full\n"
        "select:\n  candidates: [mobilenetv2_100, scratch:mobilenetv2_100]\n"
    )
    return p


def test_defaults_without_file():
    p = load_params(None)
    assert p == Params()
    assert p.train.epochs == 20 and p.data.image_size == "auto" and p.seed == 0


def test_built_in_defaults_decide_like_the_repositorys_params_yaml():
    # a user outside the repository (no ./params.yaml) gets the same decisions as `make demo`
    import pathlib

    repo = load_params(pathlib.Path(__file__).resolve().parents[2] / "params.yaml")
    assert repo.model_dump() == Params().model_dump()


def test_reads_file_and_keeps_defaults_for_the_rest(params_file):
    p = load_params(params_file)
    assert p.seed == 5
    assert p.data.image_size == 64 and p.data.batch_size == 16
    assert p.train.epochs == 7 and p.train.lr == 0.01 and p.train.strategy == "full"
    assert p.select.candidates == ["mobilenetv2_100", "scratch:mobilenetv2_100"]
    assert p.train.patience == Params().train.patience  # not in the file: default
    assert p.data.val_fraction == 0.2


def test_string_overrides_are_yaml_typed(params_file):
    p = load_params(
        params_file,
        ["train.epochs=3", "data.image_size=null", "train.augment=false", "select.candidates=[a, b]", "seed=9"],
    )
    assert p.train.epochs == 3 and isinstance(p.train.epochs, int)
    assert p.data.image_size is None
    assert p.train.augment is False
    assert p.select.candidates == ["a", "b"]
    assert p.seed == 9
    assert p.train.lr == 0.01  # untouched keys from the file survive


def test_dict_overrides(params_file):
    p = load_params(params_file, {"train.epochs": 4, "data.batch_size": 8, "export.name": "digits"})
    assert (p.train.epochs, p.data.batch_size, p.export.name) == (4, 8, "digits")
    assert p.seed == 5


def test_overrides_without_file():
    p = load_params(None, ["train.epochs=2"])
    assert p.train.epochs == 2 and p.train.lr == Params().train.lr


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.bogus=1", "train.bogus"),
        ("bogus.key=1", "bogus"),
        ("train.epochs=0", "train.epochs"),  # below ge=1
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("train.strategy=sideways", "train.strategy"),
        ("select.metric=accuracy", "select.metric"),
        ("data.image_size=8", "data.image_size"),  # below ge=16
        ("data.image_size=big", "data.image_size"),  # neither a side nor auto/null
    ],
)
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_params(None, [override])
    assert repr(field) in str(e.value)


def test_bad_value_in_file_names_the_field(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_params(p)


def test_override_into_a_scalar_is_an_error(params_file):
    with pytest.raises(ConfigError, match="seed"):
        load_params(params_file, ["seed.x=1"])


def test_override_syntax():
    with pytest.raises(ConfigError, match="group.key=value"):
        load_params(None, ["train.epochs"])


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_params(p)
    assert str(p) in str(e.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_params(empty) == Params()


def test_dump_and_load_round_trip(params_file, tmp_path):
    p = load_params(params_file, {"train.epochs": 11, "export.name": "x", "data.image_size": None})
    out = tmp_path / "run" / "params.yaml"
    dump_params(p, out)
    tree = yaml.safe_load(out.read_text())
    assert tree["train"]["epochs"] == 11 and tree["seed"] == 5  # plain YAML, resolved values
    back = load_params(out)
    assert back == p
    assert back.model_dump() == p.model_dump()


def test_repository_params_yaml_validates():
    path = REPO / "params.yaml"
    if not path.is_file():
        pytest.skip("no params.yaml in the repository yet")
    p = load_params(path)
    assert isinstance(p, Params)


def test_adabn_accepts_yaml_on_off(tmp_path):
    """YAML 1.1 reads a bare off/on as a boolean; the switch still means what was written."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  adabn: off\n")
    assert load_params(p).train.adabn == "off"
    p.write_text("train:\n  self_training: off\n")  # as `dvc exp run -S` writes params.yaml back
    assert load_params(p).train.self_training == "off"
    p.write_text("train:\n  self_training: on\n")
    assert load_params(p).train.self_training == "auto"
    assert load_params(None, ["train.adabn=on"]).train.adabn == "on"
    with pytest.raises(ConfigError, match="adabn"):
        load_params(None, ["train.adabn=sometimes"])


def test_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    """8: a billion-laughs params.yaml ran to 8.5 GB (the message rendered the expanded value)."""
    import resource
    import time

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):  # 9^9 = 387,420,489 strings once expanded
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("train:\n  epochs: *i")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"bomb.yaml: expands to more than 100000 values") as e:
        load_params(tmp_path / "bomb.yaml")
    assert time.time() - t0 < 2 and len(str(e.value)) < 300
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000  # kB: no expansion happened
    # small anchors stay usable
    (tmp_path / "ok.yaml").write_text("train:\n  lr: &lr 0.001\n  head_lr: *lr\n")
    assert load_params(tmp_path / "ok.yaml").train.head_lr == 0.001


def test_deep_and_large_inputs_are_bounded(tmp_path):
    (tmp_path / "deep.yaml").write_text("train:\n  epochs: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested more than 32 levels"):
        load_params(tmp_path / "deep.yaml")
    (tmp_path / "big.yaml").write_text("seed: 1\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="big.yaml: .* bytes; a params file may have at most 1048576"):
        load_params(tmp_path / "big.yaml")
    (tmp_path / "latin1.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8"):
        load_params(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="override 'train.epochs': nested more than 32 levels"):
        load_params(None, ["train.epochs=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize(
    "override, text",
    [
        ("train.epochs=[1", "override 'train.epochs': not valid YAML"),
        ("train.head_lr=.inf", "params field 'train.head_lr': Input should be a finite number"),
        ("train.lr=.inf", "params field 'train.lr': Input should be a finite number"),
        ("train.lr=.nan", "params field 'train.lr': Input should be a finite number"),
        ("export.parity_atol=-.inf", "params field 'export.parity_atol'"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_field(override, text):
    """8: `--set 'train.epochs=[1'` printed an 84-line YAML traceback; `train.head_lr=.inf` crashed."""
    with pytest.raises(ConfigError) as e:
        load_params(None, [override])
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_prints_one_line_for_bad_overrides(tmp_path):
    import subprocess
    import sys

    for override in ("train.epochs=[1", "train.head_lr=.inf"):
        r = subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "data", "check", str(tmp_path), "--set", override],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "train." in r.stderr, r.stderr


def test_a_retired_key_is_ignored_with_a_warning(tmp_path):
    """Run folders and params.yaml files written before the clock-free search still load."""
    old = tmp_path / "params.yaml"
    old.write_text("train:\n  budget_minutes: 5\n  epochs: 7\n")
    with pytest.warns(FutureWarning, match=r"train\.budget_minutes.*not by a clock"):
        p = load_params(old)
    assert p.train.epochs == 7 and p.train.search_mode == "evidence"
    with pytest.raises(ConfigError, match="train.budget_minute"):  # a typo is still an error, not a retired key
        load_params(None, {"train.budget_minute": 5})
