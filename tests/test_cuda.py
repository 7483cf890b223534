"""Mixed precision, the fused optimizer, CUDA graphs and the fused loss, on CUDA and on the CPU.

The first tests run once per device: on CUDA where a GPU is present (benchmarks/gpu_check.sh runs
this file there), and on the CPU everywhere, so that CI without a GPU still exercises the same code
paths: fused AdamW, bfloat16 autocast, and float16 with a gradient scaler whose state a resumed
run restores exactly. The last ones need CUDA: they are the twins of tests/test_step.py's CPU tests
with real CUDA graphs (the graphed step against the eager one, resume) and the fused loss in
bfloat16 on the GPU's kernels.
"""

import math

import pytest
import torch

import model as model_module
import sample
import train
from config import TrainConfig
from gpt_train import cuda_graphs, optim
from conftest import (TINY_VOCAB, assert_equal_nested, assert_same_run_state, exit_status,
                      logged_steps, one_error_line, read_checkpoint, tiny_argv, tiny_model,
                      write_corpus)
from gpt_train.runtime import autocast_context

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def test_cuda_on_a_cpu_only_torch_says_so_before_anything_about_the_run(trained_run, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    # trained_run holds a run, which a new run there would be refused for replacing
    assert exit_status(train.train, ["--device", "cuda", "--checkpoint_dir", str(trained_run)]) == 2
    one_error_line(capsys.readouterr().err, "--device cuda", "is a CPU-only build",
                   "pytorch.org", "or use --device cpu")
    # sample.py with no run to read: the device, too, is named first
    assert exit_status(sample.main, ["--device", "cuda", "--checkpoint_dir", str(tmp_path)]) == 2
    one_error_line(capsys.readouterr().err, "is a CPU-only build")


def random_batch(device, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, TINY_VOCAB, (2, batch_size, 16), generator=generator)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_the_optimizer_is_fused_adamw_and_its_step_updates_the_weights(device):
    model = tiny_model().to(device).train()
    optimizer = optim.configure_optimizer(model, TrainConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    x, y = random_batch(device)
    model(input_ids=x, labels=y).loss.backward()
    optimizer.step()
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_runs_the_matmuls_in_bfloat16_and_returns_a_finite_float32_loss(device):
    model = tiny_model().to(device).train()
    matmul_outputs = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: matmul_outputs.append(out.dtype))
    x, y = random_batch(device)
    with autocast_context(torch.device(device), torch.bfloat16):
        output = model(input_ids=x, labels=y)
    assert matmul_outputs == [torch.bfloat16]
    assert output.logits.dtype == torch.bfloat16  # the LM head is a matmul too
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    assert model.token_embedding.weight.dtype == torch.float32  # the weights stay in float32


@pytest.mark.parametrize("device", DEVICES)
def test_a_bfloat16_run_trains_below_the_uniform_loss_without_a_gradient_scaler(device, tmp_path):
    data = write_corpus(tmp_path)
    record = train.train(tiny_argv(tmp_path / "run", data, device=device, dtype="bfloat16",
                                   max_iters=30, warmup_iters=2, save_iter=30, eval_iter=30))
    vocab_size = read_checkpoint(tmp_path / "run" / "gpt_final.pt")["gpt_config"]["vocab_size"]
    # ln(vocab_size) is the loss of a uniform guess, about what the untrained model scores
    assert math.isfinite(record["val_loss"])
    assert record["val_loss"] < math.log(vocab_size) - 0.5
    assert "scaler_state_dict" not in read_checkpoint(tmp_path / "run" / "gpt_step30.pt")


@pytest.mark.parametrize("device", DEVICES)
def test_a_float16_run_with_a_gradient_scaler_resumes_bit_for_bit(device, tmp_path):
    data = write_corpus(tmp_path)
    flags = dict(device=device, dtype="float16", max_iters=8, save_iter=4, eval_iter=4)
    train.train(tiny_argv(tmp_path / "whole", data, **flags))
    halfway = tmp_path / "whole" / "gpt_step4.pt"
    train.train(tiny_argv(tmp_path / "resumed", data, resume=halfway, **flags))

    saved = read_checkpoint(halfway)
    assert saved["scaler_state_dict"]["scale"] > 0  # float16 trains with the scaler on
    whole = read_checkpoint(tmp_path / "whole" / "gpt_step8.pt")
    resumed = read_checkpoint(tmp_path / "resumed" / "gpt_step8.pt")
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
                "scaler_state_dict", "loss"):
        assert_equal_nested(whole[key], resumed[key], key)


# ---------------------------------------------------------------- CUDA graphs and the fused loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def watch_recorders(monkeypatch):
    """The recorders train.build_run makes from here on, newest last."""
    made = []

    def recorder_for(device):
        made.append(cuda_graphs.recorder_for(device))
        return made[-1]

    monkeypatch.setattr(train, "recorder_for", recorder_for)
    return made


@needs_cuda
def test_a_cuda_graph_step_matches_the_eager_step_bit_for_bit(tmp_path, monkeypatch):
    # the same kernels run in both: a replay only skips the Python and the launches
    recorders = watch_recorders(monkeypatch)
    data = write_corpus(tmp_path)
    flags = dict(device="cuda", dtype="bfloat16", grad_accum_steps=2, warmup_iters=3, max_iters=10,
                 log_iter=1, eval_iter=10, save_iter=10)
    train.train(tiny_argv(tmp_path / "graphed", data, **flags))
    train.train(tiny_argv(tmp_path / "eager", data, cuda_graphs="false", **flags))

    assert isinstance(recorders[0], cuda_graphs.CUDAGraphRecorder)
    assert recorders[0].recordings == 1, "the step was not recorded (see the note in the output)"
    assert logged_steps(tmp_path / "graphed") == logged_steps(tmp_path / "eager")
    assert_same_run_state(tmp_path / "graphed" / "gpt_step10.pt",
                          tmp_path / "eager" / "gpt_step10.pt")


@needs_cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_cuda_graph_run_resumes_bit_for_bit(tmp_path, monkeypatch, dropout):
    # the whole run replays from step 4 on; the resumed one warms up eagerly on steps 6-8
    recorders = watch_recorders(monkeypatch)
    data = write_corpus(tmp_path)
    flags = dict(device="cuda", dtype="bfloat16", dropout=dropout, max_iters=10, save_iter=5,
                 eval_iter=5)
    train.train(tiny_argv(tmp_path / "whole", data, **flags))
    train.train(tiny_argv(tmp_path / "resumed", data, resume=tmp_path / "whole" / "gpt_step5.pt",
                          **flags))

    assert [r.recordings for r in recorders] == [1, 1]
    assert_same_run_state(tmp_path / "whole" / "gpt_step10.pt",
                          tmp_path / "resumed" / "gpt_step10.pt")


@needs_cuda
def test_the_fused_loss_matches_the_plain_loss_on_cuda_in_bfloat16(monkeypatch):
    monkeypatch.setattr(model_module, "CHUNK_ELEMENTS", 512 * 64)  # 4 chunks of 64 rows
    model = tiny_model(vocab_size=512, block_size=64, n_layer=1, n_embd=64).cuda().train()
    x, y = torch.randint(0, 512, (2, 4, 64), device="cuda")
    y[0, :10] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        with autocast_context(torch.device("cuda"), torch.bfloat16):
            loss = model(input_ids=x, labels=y, return_logits=return_logits).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_gradients), (fused, fused_gradients) = results
    assert abs(fused - plain_loss) < 1e-3
    for name, gradient in plain_gradients.items():
        scale = gradient.abs().max()
        assert (fused_gradients[name] - gradient).abs().max() <= 2e-2 * scale, name
