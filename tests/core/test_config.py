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
    old = {"task": "sst2", "sam": "delta-sam", "beta": 3.0}  # a δ-SAM run written before delta_weights existed
    today = {"task": "sst2", "sam": "delta-sam", "delta_beta": 3.0, "delta_weights": "literal"}
    assert upgrade_config(old) == today and "beta" in old
    assert comparable(old) == comparable(today)
    # it ran Eq. 6 as printed: resuming it with today's default (clipped) would silently change the run
    assert comparable(old) != comparable({**today, "delta_weights": "clipped"})


def test_recipes_fill_what_the_user_did_not_set_with_the_papers_values(tmp_path):
    from landscape.cli.main import build_parser
    from landscape.cli.train import config_from_args

    def config(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv])).resolved()

    rte = config("--task", "rte", "--recipe", "delta-sam")
    assert (rte.sam, rte.rho, rte.delta_beta, rte.recipe) == ("delta-sam", 0.05, 70.0, "delta-sam")  # Table 3
    stsb = config("--task", "stsb", "--recipe", "delta-sam", "--delta-beta", "3")  # a flag wins over the recipe
    assert (stsb.rho, stsb.delta_beta) == (0.01, 3.0)
    (tmp_path / "c.yaml").write_text("task: cola\nrecipe: bahri\nrho: 0.05\n")  # so does the file, default or not
    cola = config("--config", str(tmp_path / "c.yaml"))
    assert (cola.sam, cola.rho, cola.ascent_fraction) == ("sam", 0.05, 0.25)
    fsam = config("--task", "rte", "--recipe", "fsam")
    assert (fsam.sam, fsam.rho, fsam.sparsity, fsam.mask_interval, fsam.lr, fsam.epochs) == (
        "fsam",
        0.01,
        0.9,
        100,
        4e-5,
        3,
    )
    with pytest.raises(ConfigError, match="gives no ρ and β for task 'cb'"):
        config("--task", "cb", "--recipe", "delta-sam")
    python = TrainConfig.from_recipe("delta-sam", "mrpc", seed=3)
    assert (python.delta_beta, python.seed, python.recipe) == (10.0, 3, "delta-sam")


def test_variant_defaults_and_adam_betas_reach_the_optimizer():
    esam = TrainConfig(task="sst2", sam="esam").resolved()
    assert esam.same_dropout is True and TrainConfig(task="sst2", sam="sam").resolved().same_dropout is False
    assert TrainConfig(task="sst2", sam="esam", same_dropout=False).resolved().same_dropout is False
    with pytest.raises(ConfigError, match=r"adam_beta2 must be in \[0, 1\)"):
        TrainConfig(task="sst2", adam_beta2=1.0).resolved()


def test_adam_betas_and_piece_options_reach_the_built_optimizer():
    from torch import nn

    from landscape.training.loop import build_optimizer

    model = nn.Sequential(nn.Linear(3, 2))
    config = TrainConfig(task="sst2", sam="delta-sam", adam_beta1=0.0, delta_weights="literal", rho=0.02).resolved()
    optimizer = build_optimizer(config, model)
    assert optimizer.param_groups[0]["betas"] == (0.0, 0.999) and optimizer.param_groups[0]["rho"] == 0.02
    weighting = next(p for p in optimizer.pieces if type(p).__name__ == "InstanceReweighting")
    assert weighting.clipped is False
