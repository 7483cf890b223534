"""The modern GPT options (RoPE, RMSNorm, QK-norm, ReLU², SwiGLU, an untied head) and Muon.

Each option trains a tiny model once per module; the tests then read its checkpoint. Whether an
option computes what its name says is checked against an independent reference where one
exists: Hugging Face's implementation, in tests/test_export.py.
"""

import math

import pytest
import torch

import train
from checkpoint import model_from_checkpoint
from config import GPTConfig
from conftest import exit_status, one_error_line, tiny_argv, write_corpus
from model import build_model, count_parameters, flops_per_token

OPTIONS = {
    "rope": {"pos": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": "true"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "untied": {"tie_embeddings": "false"},
    "all_modern": {"pos": "rope", "norm": "rmsnorm", "qk_norm": "true", "mlp": "swiglu",
                   "tie_embeddings": "false", "bias": "false"},
}
TRAINING = dict(max_iters=10, learning_rate=1e-2, log_iter=10, eval_iter=10, save_iter=5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per option: {name: (checkpoint directory, final record)}."""
    root = tmp_path_factory.mktemp("modern")
    data = write_corpus(root)
    return {name: (root / name, train.train(tiny_argv(root / name, data, **TRAINING, **flags)))
            for name, flags in OPTIONS.items()}


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_trains_a_tiny_model_below_the_uniform_loss(runs, name):
    directory, record = runs[name]
    model, _, _ = model_from_checkpoint(directory / "gpt_final.pt")
    assert record["val_loss"] < math.log(model.config.vocab_size) - 0.5


@pytest.mark.parametrize("name", OPTIONS)
def test_cached_generation_equals_uncached_for_each_option_while_the_window_slides(runs, name):
    model, _, _ = model_from_checkpoint(runs[name][0] / "gpt_final.pt")
    prompt = torch.tensor([[1, 2, 3]])
    new_tokens = 3 * model.config.block_size  # the context window slides several times
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_each_option_builds_the_part_it_names():
    def state_of(**options):
        return build_model(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                     **options)).state_dict()

    default = state_of()
    assert "position_embedding.weight" not in state_of(pos="rope")
    assert "blocks.0.ln_1.bias" in default and "blocks.0.ln_1.bias" not in state_of(norm="rmsnorm")
    assert state_of(qk_norm=True)["blocks.0.attn.q_norm.weight"].shape == (16,)
    swiglu = state_of(mlp="swiglu")  # a gate and a value: 2 x (2/3 of 4 x 32, rounded up to 32)
    assert swiglu["blocks.0.mlp.fc.weight"].shape == (2 * 96, 32)
    assert swiglu["blocks.0.mlp.proj.weight"].shape == (32, 96)
    untied = state_of(tie_embeddings=False)
    assert not torch.equal(untied["lm_head.weight"], untied["token_embedding.weight"])
    assert torch.equal(default["lm_head.weight"], default["token_embedding.weight"])


def test_relu2_squares_the_relu_of_the_first_projection():
    model = build_model(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                  mlp="relu2"))
    mlp, x = model.blocks[0].mlp, torch.randn(2, 5, 32)
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))


def test_the_default_model_keeps_the_gpt2_state_dict_keys_of_existing_checkpoints():
    model = build_model(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    block = [f"blocks.0.{name}" for name in (
        "ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ln_2.weight", "ln_2.bias", "mlp.fc.weight", "mlp.fc.bias",
        "mlp.proj.weight", "mlp.proj.bias")]
    assert list(model.state_dict()) == ["token_embedding.weight", "position_embedding.weight",
                                        *block, "ln_f.weight", "ln_f.bias", "lm_head.weight"]


def test_flops_per_token_leaves_out_lookups_the_position_table_and_an_untied_embedding():
    shape = dict(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)
    attention = 12 * 1 * 32 * 16
    default = build_model(GPTConfig(**shape))
    assert flops_per_token(default) == 6 * (count_parameters(default) - 16 * 32) + attention
    modern = build_model(GPTConfig(**shape, pos="rope", tie_embeddings=False))
    assert flops_per_token(modern) == 6 * (count_parameters(modern) - 40 * 32) + attention


def test_fine_tuning_a_rope_model_with_a_smaller_block_size_keeps_its_weights(runs, tmp_path):
    base = runs["all_modern"][0] / "gpt_final.pt"
    data = write_corpus(tmp_path)
    train.train(["--init_from", str(base), "--block_size", "8", "--max_iters", "1",
                 "--data", str(data), "--checkpoint_dir", str(tmp_path / "tuned"),
                 "--device", "cpu", "--learning_rate", "1e-9", "--warmup_iters", "0"])
    tuned, _, _ = model_from_checkpoint(tmp_path / "tuned" / "gpt_final.pt")
    original, _, _ = model_from_checkpoint(base)
    assert tuned.config.block_size == 8 and tuned.config.pos == "rope"
    assert torch.allclose(tuned.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight,
                          atol=1e-6)
    # the rotary table is computed, not saved: the first 8 positions rotate as before
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11]])
    assert torch.allclose(tuned(ids).logits, original(ids).logits, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--pos", "alibi"], "unknown --pos 'alibi'; choose one of learned, rope"),
    (["--mlp", "geglu"], "unknown --mlp 'geglu'; choose one of gelu, relu2, swiglu"),
    (["--pos", "rope", "--n_embd", "30", "--n_head", "10"], "the head size"),
])
def test_an_unknown_option_or_an_odd_rope_head_is_one_line_and_status_2(flags, message, capsys):
    assert exit_status(train.train, flags + ["--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, message)


def test_resuming_with_a_contradicting_option_is_one_line_and_status_2(runs, capsys):
    step = runs["rope"][0] / "gpt_step5.pt"
    assert exit_status(train.train, ["--resume", str(step), "--pos", "learned"]) == 2
    one_error_line(capsys.readouterr().err, "--pos learned contradicts the checkpoint")
