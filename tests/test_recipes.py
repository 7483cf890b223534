"""Recipes: --config files, flags over them, --print_config, and one-line errors naming file and key."""

import tomllib

import pytest

import train
from conftest import REPO, exit_status, one_error_line, read_checkpoint, tiny_argv

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


def printed_config(argv, capsys):
    """What `train.py ARGV --print_config` prints, parsed as TOML."""
    capsys.readouterr()
    assert exit_status(train.train, [*argv, "--print_config"]) == 0
    return tomllib.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_shipped_recipe_resolves_to_its_own_values(recipe, capsys):
    resolved = printed_config(["--config", str(recipe)], capsys)
    with open(recipe, "rb") as handle:
        assert tomllib.load(handle).items() <= resolved.items()


def test_flags_override_the_recipe_and_the_recipe_overrides_the_defaults(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('n_layer = 3\nlearning_rate = 1\nbetas = [0.8, 0.9]\ntokenizer = "byte"\n')
    resolved = printed_config(["--config", str(recipe), "--n_layer", "2"], capsys)
    assert resolved["n_layer"] == 2
    assert (resolved["learning_rate"], resolved["betas"], resolved["tokenizer"]) == \
        (1.0, [0.8, 0.9], "byte")
    assert resolved["n_head"] == 4  # the default: neither the recipe nor a flag set it


def test_a_printed_config_runs_to_the_same_checkpoint_configs(tmp_path, corpus_file, capsys):
    run_dir = tmp_path / "run"
    argv = tiny_argv(run_dir, corpus_file, max_iters=2, warmup_iters=1, eval_iter=2, save_iter=2,
                     betas=[0.8, 0.9], bias="false", learning_rate=3e-3, dropout=0.1)
    train.train(argv)
    direct = read_checkpoint(run_dir / "gpt_final.pt")
    run_dir.rename(tmp_path / "direct")
    recipe = tmp_path / "printed.toml"
    capsys.readouterr()
    assert exit_status(train.train, [*argv, "--print_config"]) == 0
    recipe.write_text(capsys.readouterr().out)
    train.train(["--config", str(recipe)])
    from_recipe = read_checkpoint(run_dir / "gpt_final.pt")
    for name in ("gpt_config", "train_config"):
        assert from_recipe[name] == direct[name]


# (recipe text, what the one line must also name besides the file): the key at fault
BAD_RECIPES = [
    ("n_layer = 2\nlearning_rat = 0.01\n", "learning_rat"),  # unknown key
    ("[model]\nn_layer = 2\n", "model"),  # a table: recipes are flat
    ('n_layer = "two"\n', "n_layer"),  # wrong type
    ("max_iters = 1e3\n", "max_iters"),  # a float for an integer field
    ("bias = 1\n", "bias"),
    ("betas = [0.9]\n", "betas"),
    ("learning_rate = -0.01\n", "learning_rate"),  # invalid value (config.validate)
    ('tokenizer = ""\n', "tokenizer"),  # any other value may name a pretrained one
    ('log_to = "jsonl,csv"\n', "log_to"),
    ("n_layer = 2\nn_layer = 3\n", "n_layer"),  # not TOML: a key given twice
]


@pytest.mark.parametrize("text, key", BAD_RECIPES, ids=[key for _, key in BAD_RECIPES])
def test_a_bad_recipe_is_one_line_naming_the_file_and_the_key(text, key, tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    checkpoint_dir = tmp_path / "checkpoints"
    status = exit_status(train.train, ["--config", str(recipe), "--checkpoint_dir",
                                       str(checkpoint_dir)])
    assert status == 2
    line = one_error_line(capsys.readouterr().err, f"error: {recipe}: ")
    assert key in line or "line 2" in line  # TOML's own errors give the line instead
    assert not checkpoint_dir.exists()


def test_an_invalid_flag_is_not_blamed_on_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("n_layer = 2\n")
    status = exit_status(train.train, ["--config", str(recipe), "--learning_rate", "0"])
    assert status == 2
    assert str(recipe) not in one_error_line(capsys.readouterr().err, "--learning_rate")


def test_a_missing_recipe_is_one_line(tmp_path, capsys):
    status = exit_status(train.train, ["--config", str(tmp_path / "absent.toml")])
    assert status == 2
    one_error_line(capsys.readouterr().err, "absent.toml")
