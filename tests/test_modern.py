"""The modern GPT options (RoPE, RMSNorm, QK-norm, ReLU², SwiGLU, an untied head) and Muon.

Each option trains a tiny model once per module; the tests then read its checkpoint. Whether an
option computes what its name says is checked against an independent reference where one
exists: Hugging Face's implementation, in tests/test_export.py.
"""

import math
import re

import pytest
import torch

import export
import train
from gpt_train.checkpoint import model_from_checkpoint
from config import GPTConfig, TrainConfig, UserError
from conftest import (assert_same_weights, checkpoint_weights, exit_status, metrics_records,
                      one_error_line, read_checkpoint, tiny_argv, write_corpus)
from model import build_model, count_parameters, flops_per_token
from gpt_train.optim import (base_learning_rates, configure_optimizer, newton_schulz,
                   newton_schulz_dtype)

OPTIONS = {
    "rope": {"pos": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": "true"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "untied": {"tie_embeddings": "false"},
    "all_modern": {"pos": "rope", "norm": "rmsnorm", "qk_norm": "true", "mlp": "swiglu",
                   "tie_embeddings": "false", "bias": "false"},
    "llama": {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": "false"},
    "llama_untied_with_bias": {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                               "tie_embeddings": "false"},
}
OPTIONS_OF_QWEN3 = dict(pos="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu")
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


# ------------------------------------------------------------------------------- export

EXPORTS = {"llama": "LlamaForCausalLM", "llama_untied_with_bias": "LlamaForCausalLM",
           "all_modern": "Qwen3ForCausalLM", "relu2": "GPT2LMHeadModel",
           "untied": "GPT2LMHeadModel"}
REFUSALS = {"rope": "--norm layernorm does not export: with --pos rope the Hugging Face class "
                    "is LlamaForCausalLM, which needs --norm rmsnorm",
            "rmsnorm": "--norm rmsnorm does not export: with --pos learned the Hugging Face class "
                       "is GPT2LMHeadModel, which needs --norm layernorm",
            "swiglu": "--mlp swiglu does not export: with --pos learned the Hugging Face class "
                      "is GPT2LMHeadModel, which needs --mlp gelu or relu2",
            "qk_norm": "--qk_norm true does not export with --pos learned"}


@pytest.mark.parametrize("name", EXPORTS)
def test_each_exportable_combination_gives_our_logits_in_transformers(runs, name, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    checkpoint = runs[name][0] / "gpt_final.pt"
    export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == EXPORTS[name]
    ours, tokenizer, _ = model_from_checkpoint(checkpoint)
    ids = torch.randint(0, tokenizer.vocab_size, (2, ours.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        our_logits, their_logits = ours(ids).logits, theirs(ids).logits
    assert our_logits.std() > 0.5  # trained weights: a wrong layout could not hide in the noise
    assert torch.allclose(their_logits, our_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("options, message", [
    ({"bias": True}, "--bias true does not export: with --pos rope --qk_norm true the Hugging Face "
                     "class is Qwen3ForCausalLM, which needs --bias false"),
    ({"bias": False, "mlp": "relu2"},
     "--mlp relu2 does not export: with --pos rope --qk_norm true"),
])
def test_a_qk_norm_model_exports_as_qwen3_only_with_what_qwen3_computes(options, message):
    config = GPTConfig(**{**OPTIONS_OF_QWEN3, **options})
    with pytest.raises(UserError, match="^" + re.escape(message)):
        export.export_family(config)


@pytest.mark.parametrize("name", REFUSALS)
def test_every_other_combination_is_refused_in_one_line_naming_the_option(runs, name, tmp_path,
                                                                         capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "hf"
    status = exit_status(export.main, ["--checkpoint", str(runs[name][0] / "gpt_final.pt"),
                                       "--out", str(out)])
    assert status == 2
    one_error_line(capsys.readouterr().err, REFUSALS[name])
    assert not out.exists()


# ------------------------------------------------------------------------------------- Muon

MUON = dict(optimizer="muon", max_iters=8, save_iter=4, log_iter=1, eval_iter=4, dropout=0.1,
            learning_rate=1e-2, muon_learning_rate=0.05,
            grad_accum_steps=2)


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory):
    """A Muon run with dropout and gradient accumulation, and the same run resumed at step 4."""
    root = tmp_path_factory.mktemp("muon")
    data = write_corpus(root)
    records = {"uninterrupted": train.train(tiny_argv(root / "uninterrupted", data, **MUON))}
    records["resumed"] = train.train(["--resume", str(root / "uninterrupted" / "gpt_step4.pt"),
                                      "--checkpoint_dir", str(root / "resumed")])
    return root, records


def test_muon_trains_a_tiny_model_below_the_uniform_loss(muon_runs):
    root, records = muon_runs
    model, _, _ = model_from_checkpoint(root / "uninterrupted" / "gpt_final.pt")
    assert records["uninterrupted"]["val_loss"] < math.log(model.config.vocab_size) - 0.5


def test_muon_updates_the_blocks_matrices_and_adamw_the_rest():
    model = build_model(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = configure_optimizer(model, TrainConfig(optimizer="muon", muon_learning_rate=0.05,
                                                       learning_rate=0.003, weight_decay=0.2))
    names = {p: name for name, p in model.named_parameters()}
    muon = [group for group in optimizer.param_groups if group["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.05
    assert sorted(names[p] for p in muon[0]["params"]) == sorted(
        f"blocks.{layer}.{matrix}.weight" for layer in (0, 1)
        for matrix in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    others = [group for group in optimizer.param_groups if not group["muon"]]
    assert {group["lr"] for group in others} == {0.003}
    decayed = [names[p] for group in others if group["weight_decay"] == 0.2 for p in group["params"]]
    assert sorted(decayed) == ["position_embedding.weight", "token_embedding.weight"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_newton_schulz_makes_every_singular_value_close_to_one(dtype, tolerance):
    matrices = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(0))
    matrices[1] *= 1e-3  # the scale of the gradient does not matter
    orthogonal = newton_schulz(matrices, steps=5, dtype=dtype)
    assert orthogonal.dtype == torch.float32
    singular_values = torch.linalg.svdvals(orthogonal)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    # the same singular vectors: the product with the original is symmetric positive (semi)definite
    product = orthogonal.mT @ matrices
    assert torch.allclose(product, product.mT, atol=tolerance * product.abs().max())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch 2.9")
def test_muon_moves_the_blocks_matrices_as_torch_optim_muon_does():
    # torch's iterates in bfloat16, ours in float32 for matrices this small: equal up to rounding
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp="swiglu")
    ours, theirs = build_model(config), build_model(config)
    theirs.load_state_dict(ours.state_dict())
    hidden = {name for name, p in ours.named_parameters()
              if p.dim() == 2 and name.startswith("blocks.")}
    settings = TrainConfig(optimizer="muon", muon_learning_rate=0.05, muon_weight_decay=0.1)
    optimizers = (configure_optimizer(ours, settings),
                  torch.optim.Muon([p for name, p in theirs.named_parameters() if name in hidden],
                                   lr=0.05, weight_decay=0.1, momentum=0.95, nesterov=True,
                                   adjust_lr_fn="original"))
    start = {name: p.detach().clone() for name, p in ours.named_parameters() if name in hidden}
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        gradients = {name: torch.randn(start[name].shape, generator=generator) for name in hidden}
        for model, optimizer in zip((ours, theirs), optimizers):
            for name, p in model.named_parameters():
                p.grad = gradients[name] if name in hidden else None
            optimizer.step()
    for name in sorted(hidden):  # qkv and fc are tall, the projections wide or square
        our_move = dict(ours.named_parameters())[name].detach() - start[name]
        their_move = dict(theirs.named_parameters())[name].detach() - start[name]
        assert (our_move - their_move).norm() < 0.02 * their_move.norm(), name


def test_newton_schulz_takes_float32_for_small_matrices_and_on_a_cpu_without_bfloat16_units(
        monkeypatch):
    assert newton_schulz_dtype(torch.zeros(2, 32, 96)) == torch.float32  # emulation would cost 3x
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert newton_schulz_dtype(torch.zeros(2, 128, 512)) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert newton_schulz_dtype(torch.zeros(2, 128, 512)) == torch.bfloat16


def test_a_resumed_muon_run_ends_with_the_uninterrupted_weights_bit_for_bit(muon_runs):
    root, _ = muon_runs
    assert_same_weights(root / "resumed" / "gpt_final.pt", root / "uninterrupted" / "gpt_final.pt")
    later = [r["loss"] for r in metrics_records(root / "uninterrupted") if r.get("step", 0) > 4]
    assert [r["loss"] for r in metrics_records(root / "resumed") if "loss" in r] == later


def test_a_resumed_muon_run_restores_the_momentum_and_both_learning_rates(muon_runs, tmp_path):
    root, _ = muon_runs
    state = read_checkpoint(root / "uninterrupted" / "gpt_step4.pt")["optimizer_state_dict"]
    assert any("momentum_buffer" in entry for entry in state["state"].values())
    assert any("exp_avg" in entry for entry in state["state"].values())
    # a resume with new peaks reshapes the schedule of each group from its own flag
    data = write_corpus(tmp_path)
    run = train.build_run(*train.configure(["--resume", str(root / "uninterrupted" / "gpt_step4.pt"),
                                            "--data", str(data), "--muon_learning_rate", "0.04",
                                            "--learning_rate", "0.001",
                                            "--checkpoint_dir", str(tmp_path / "branch")])[:2],
                          train.setup_runtime(TrainConfig(device="cpu")))
    assert base_learning_rates(run.optimizer, run.train_config) == [0.04, 0.001, 0.001]


def test_a_batch_skipped_by_skip_nonfinite_leaves_weights_and_muon_momentum_alone(
        tmp_path, monkeypatch):
    from robust_helpers import poison_training_losses
    poison_training_losses(monkeypatch, {3})
    data = write_corpus(tmp_path)
    train.train(tiny_argv(tmp_path / "run", data, optimizer="muon", max_iters=4, save_iter=1,
                          skip_nonfinite=1))
    before, after = (read_checkpoint(tmp_path / "run" / f"gpt_step{step}.pt") for step in (2, 3))
    assert_same_weights(after["model_state_dict"], before["model_state_dict"])
    for index, entry in before["optimizer_state_dict"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(after["optimizer_state_dict"]["state"][index][name]))


def test_the_float16_gradient_scaler_skips_an_overflowing_muon_step_and_takes_the_next():
    model = build_model(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    optimizer = configure_optimizer(model, TrainConfig(optimizer="muon"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for poison in (True, False):
        loss = model(ids, labels=ids).loss
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
        assert changed == ([] if poison else list(before)), changed
    assert scaler.get_scale() == 2.0 ** 15  # halved once, by the overflow


@pytest.mark.slow
def test_two_muon_processes_end_with_the_weights_of_one_with_the_same_global_batch(tmp_path):
    from conftest import REPO, torchrun
    data = write_corpus(tmp_path)
    flags = dict(optimizer="muon", max_iters=6, save_iter=6, eval_iter=6, grad_accum_steps=2)
    two = torchrun([REPO / "train.py", *tiny_argv(tmp_path / "two", data, batch_size=4, **flags)],
                   tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    train.train(tiny_argv(tmp_path / "one", data, batch_size=8, **flags))
    ddp, single = (checkpoint_weights(tmp_path / name / "gpt_final.pt") for name in ("two", "one"))
    assert ddp.keys() == single.keys()
    assert max((ddp[key] - single[key]).abs().max().item() for key in ddp) < 1e-5
