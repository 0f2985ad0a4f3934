"""Options from defaults, YAML, flags and key=value overrides; every shipped config loads."""

import shlex
from pathlib import Path

import pytest

from landscape.cli.main import build_parser
from landscape.cli.train import config_from_args
from landscape.core.config import build_config, load_yaml, parse_overrides
from landscape.core.errors import ConfigError
from landscape.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_precedence_defaults_yaml_flags_overrides(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("task: mrpc\nlr: 1.0e-5\nbatch-size: 8\nseed: 3\n")
    args = build_parser().parse_args(
        ["train", "--config", str(config_file), "--batch-size", "4", "--seed", "5", "seed=7", "epochs=2"]
    )
    config = config_from_args(args)
    assert config.task == "mrpc"  # from YAML
    assert config.lr == 1e-5  # YAML, not overridden
    assert config.batch_size == 4  # flag beats YAML
    assert config.seed == 7  # key=value beats flag
    assert config.epochs == 2
    assert config.weight_decay == 0.01  # default


def test_overrides_are_typed():
    overrides = parse_overrides(["task=mrpc", "lr=3e-5", "epochs=2", "model=minilm", "dropout=null"])
    config = build_config(TrainConfig, overrides)
    assert (config.lr, config.epochs, config.model, config.dropout) == (3e-5, 2, "minilm", None)
    assert isinstance(config.lr, float) and isinstance(config.epochs, int)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"task": "mrpc", "batchsize": 8}, "unknown option 'batchsize'"),
        ({"task": "mrpc", "lr": "fast"}, "lr = 'fast'"),
        ({"task": "mrpc", "batch_size": 2.5}, "batch_size = 2.5"),
        ({"task": "mrpc", "batch_size": True}, "batch_size = True"),
        ({"lr": 1e-5}, "missing required option"),
    ],
)
def test_bad_values_name_the_key(source, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, source)


def test_yaml_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_configs_are_shipped():
    assert SHIPPED, "no configs/*.yaml found"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path, monkeypatch):
    monkeypatch.chdir(REPO)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# landscape "), first_line
    argv = shlex.split(first_line[1:].strip())[1:]
    args = build_parser().parse_args(argv)
    assert Path(args.config) == path.relative_to(REPO)
    config = config_from_args(args).resolved()
    assert config.task and config.lr > 0 and config.epochs > 0


def test_a_renamed_option_is_refused_with_its_new_name_and_old_runs_still_compare(tmp_path, capsys):
    from landscape.cli.main import main
    from landscape.training.config import comparable, upgrade_config

    assert main(["train", "--task", "sst2", "beta=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'beta' is now called 'delta_beta'" in err
    old = {"task": "sst2", "sam": "delta-sam", "beta": 3.0}
    assert upgrade_config(old) == {"task": "sst2", "sam": "delta-sam", "delta_beta": 3.0} and "beta" in old
    assert comparable(old) == comparable({"task": "sst2", "sam": "delta-sam", "delta_beta": 3.0})
