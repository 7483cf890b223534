"""Mixed precision and the fused optimizer, on CUDA and on the CPU.

Each test runs once per device: on CUDA where a GPU is present (benchmarks/gpu_check.sh runs this
file there), and on the CPU everywhere, so that CI without a GPU still exercises the same code
paths: fused AdamW, bfloat16 autocast, and float16 with a gradient scaler whose state a resumed
run restores exactly.
"""

import math

import pytest
import torch

import optim
import train
from config import TrainConfig
from conftest import TINY_VOCAB, read_checkpoint, tiny_argv, tiny_model, write_corpus
from runtime import autocast_context

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def random_batch(device, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, TINY_VOCAB, (2, batch_size, 16), generator=generator)
    return x.to(device), y.to(device)


def assert_equal_nested(a, b, where="state"):
    """Tensors equal bit for bit, everything else equal, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where} keys differ"
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where} lengths differ"
        for index, (item_a, item_b) in enumerate(zip(a, b)):
            assert_equal_nested(item_a, item_b, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


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
