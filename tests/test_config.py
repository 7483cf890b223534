"""Flags, their overrides, and every validation rule, checked through the real entry point."""

import dataclasses
import re

import pytest

import train
from config import (GPTConfig, TrainConfig, UserError, apply_args_to_configs, config_from_dict,
                    config_to_dict, parse_args, shown_default, validate)
from conftest import exit_status, one_error_line
from gpt_train.cli import ResourceError

ALL_FIELDS = [(config_class, f) for config_class in (GPTConfig, TrainConfig)
              for f in dataclasses.fields(config_class)]


def configs_from(argv, gpt_config=None, train_config=None):
    return apply_args_to_configs(parse_args(argv), gpt_config or GPTConfig(),
                                 train_config or TrainConfig())


def test_no_flags_leaves_every_default_in_place():
    assert vars(parse_args([])) == {}
    assert configs_from([]) == (GPTConfig(), TrainConfig())


def test_only_the_flags_given_are_applied_over_existing_values():
    saved_gpt, saved_train = GPTConfig(n_layer=7, n_embd=96), TrainConfig(max_iters=123, seed=5)
    gpt_config, train_config = configs_from(["--n_embd", "64", "--max_iters", "500"],
                                            saved_gpt, saved_train)
    assert (gpt_config.n_layer, gpt_config.n_embd) == (7, 64)
    assert (train_config.max_iters, train_config.seed) == (500, 5)
    assert train_config.learning_rate == TrainConfig().learning_rate


def test_flag_values_take_the_type_of_their_field():
    gpt_config, train_config = configs_from(["--n_layer", "3", "--learning_rate", "1e-3",
                                             "--dropout", "0", "--data", "notes.txt"])
    assert gpt_config.n_layer == 3 and type(gpt_config.n_layer) is int
    assert train_config.learning_rate == 1e-3 and type(train_config.learning_rate) is float
    assert gpt_config.dropout == 0.0 and type(gpt_config.dropout) is float
    assert train_config.data == "notes.txt"


def test_betas_take_two_floats_and_become_a_tuple():
    _, train_config = configs_from(["--betas", "0.8", "0.99"])
    assert train_config.betas == (0.8, 0.99)
    assert isinstance(train_config.betas, tuple)
    _, train_config = configs_from(["--betas", "0.9", "0.95"])
    assert train_config.betas == (0.9, 0.95)


def test_betas_with_one_value_is_a_user_error():
    with pytest.raises(UserError):
        parse_args(["--betas", "0.9"])


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("True", True),
                                         ("FALSE", False)])
def test_boolean_flags_accept_true_and_false(text, value):
    gpt_config, train_config = configs_from(["--bias", text, "--compile", text])
    assert gpt_config.bias is value and train_config.compile is value


def test_a_boolean_flag_rejects_other_words():
    with pytest.raises(UserError, match="true or false"):
        parse_args(["--bias", "maybe"])


def test_help_lists_every_field_with_its_default(capsys):
    assert exit_status(train.train, ["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for _, config_field in ALL_FIELDS:
        shown = re.escape(shown_default(config_field.default))
        pattern = rf"--{config_field.name} [^()]*\(default: {shown}\)"
        assert re.search(pattern, help_text), f"--{config_field.name} and its default are not in --help"


def test_configs_survive_the_plain_dict_round_trip_a_checkpoint_uses():
    gpt_config, train_config = GPTConfig(n_layer=2, bias=False), TrainConfig(betas=(0.8, 0.9))
    saved = config_to_dict(train_config)
    assert saved["betas"] == [0.8, 0.9]  # a list: plain data that weights_only loading accepts
    assert config_from_dict(TrainConfig, saved) == train_config
    assert config_from_dict(GPTConfig, {**config_to_dict(gpt_config), "from_a_later_version": 1}) \
        == gpt_config


def test_the_defaults_are_valid():
    validate(GPTConfig(), TrainConfig())


@pytest.mark.parametrize("gpt_values, train_values", [
    ({"dropout": 0.0}, {}),
    ({"dropout": 0.99}, {}),
    ({}, {"min_lr_ratio": 0.0}),
    ({}, {"min_lr_ratio": 1.0}),
    ({}, {"warmup_iters": 0}),
    ({}, {"warmup_iters": 50, "max_iters": 50}),
    ({}, {"device": "cuda:1"}),  # a valid name; whether the machine has it is checked later
    ({}, {"betas": (0.0, 0.999)}),
    ({"n_embd": 48, "n_head": 3}, {}),
])
def test_values_on_the_edge_of_each_rule_are_accepted(gpt_values, train_values):
    validate(GPTConfig(**gpt_values), TrainConfig(**train_values))


# (flags, the flag the one-line message must name): one case for each rule of config.validate
INVALID_VALUES = [
    *[([f"--{name}", "0"], name) for name in ("vocab_size", "block_size", "n_layer", "n_head",
                                               "n_embd")],
    (["--n_layer", "-2"], "n_layer"),
    (["--n_embd", "64", "--n_head", "3"], "n_embd"),
    (["--dropout", "-0.1"], "dropout"),
    (["--dropout", "1.0"], "dropout"),
    *[([f"--{name}", "0"], name) for name in ("batch_size", "grad_accum_steps", "max_iters",
                                               "log_iter", "eval_iter", "eval_batches",
                                               "save_iter", "bpe_vocab_size")],
    *[([f"--{name}", "-1"], name) for name in ("warmup_iters", "num_workers", "keep_last",
                                                "skip_nonfinite", "sample_tokens", "threads")],
    (["--learning_rate", "0"], "learning_rate"),
    (["--learning_rate", "-0.001"], "learning_rate"),
    (["--weight_decay", "-0.1"], "weight_decay"),
    (["--grad_clip", "-1"], "grad_clip"),
    (["--peak_flops", "-1"], "peak_flops"),
    (["--betas", "1.0", "0.95"], "betas"),
    (["--betas", "0.9", "-0.1"], "betas"),
    (["--min_lr_ratio", "-0.1"], "min_lr_ratio"),
    (["--min_lr_ratio", "1.5"], "min_lr_ratio"),
    (["--warmup_iters", "11", "--max_iters", "10"], "warmup_iters"),
    (["--val_fraction", "0"], "val_fraction"),
    (["--val_fraction", "1"], "val_fraction"),
    (["--tokenizer", " "], "tokenizer"),
    (["--dtype", "float8"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--resume", "a.pt", "--init_from", "b.pt"], "init_from"),
]

# values no type accepts: argparse's error, also one line
INVALID_TYPES = [
    (["--batch_size", "abc"], "batch_size"),
    (["--learning_rate", "fast"], "learning_rate"),
    (["--n_layer", "2.5"], "n_layer"),
    (["--no_such_flag", "1"], "no_such_flag"),
]


def case_id(value):
    return " ".join(value) if isinstance(value, list) else value


@pytest.mark.parametrize("flags, named_flag", INVALID_VALUES + INVALID_TYPES, ids=case_id)
def test_an_invalid_flag_ends_train_with_one_line_and_exit_status_2(flags, named_flag, tmp_path,
                                                                     capsys):
    checkpoint_dir = tmp_path / "checkpoints"
    status = exit_status(train.train, ["--checkpoint_dir", str(checkpoint_dir), *flags])
    assert status == 2
    one_error_line(capsys.readouterr().err, named_flag)
    assert not checkpoint_dir.exists()  # rejected before anything was written


@pytest.mark.parametrize("flags, named_flag", INVALID_VALUES, ids=case_id)
def test_validate_itself_rejects_each_invalid_value(flags, named_flag):
    with pytest.raises(UserError, match=named_flag):
        validate(*configs_from(flags))


def test_ctrl_c_before_training_starts_is_one_line_and_exit_status_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert exit_status(interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize("error, status, words", [
    (UserError("--n_layer must be positive"), 2, "--n_layer must be positive"),
    (ResourceError("could not save checkpoint: No space left on device"), 1, "No space left"),
    (MemoryError(), 1, "out of memory"),
    (RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1214."), 1,
     "another process of this run was lost: Connection closed by peer"),
], ids=["user", "machine", "memory", "lost rank"])
def test_the_users_input_exits_2_and_the_machine_1_each_in_one_line(error, status, words, capsys):
    def failing(argv):
        raise error

    assert exit_status(failing, []) == status
    one_error_line(capsys.readouterr().err, words)
