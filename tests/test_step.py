"""The training step recorded and replayed (cuda_graphs.py) and the fused loss (model.py), on a CPU.

CUDA graphs need a GPU. Here `CallRecorder`, whose replay calls the recorded step again, stands in
for them, so these tests run the logic a GPU run runs: static input buffers, eager warm-up steps,
a learning rate the schedule fills in place, recording again after a resume, and checkpoints that
move between the graph-ready optimizer (a tensor learning rate, `capturable`) and the plain one.
tests/test_cuda.py has the CUDA twins.
"""

from types import SimpleNamespace

import pytest
import torch

import model as model_module
import train
from config import GPTConfig, TrainConfig
from gpt_train import cuda_graphs
from gpt_train.checkpoint import load_checkpoint
from gpt_train.parallel import make_parallel
from conftest import (RUN_STATE_KEYS, assert_equal_nested, assert_same_run_state,
                      checkpoint_weights, logged_steps, read_checkpoint, tiny_argv, tiny_model,
                      write_corpus)
from model import build_model
from gpt_train.runtime import setup_runtime


class Recorders(list):
    """Stands in for train.recorder_for: every run gets a new CallRecorder, listed here."""

    def __call__(self, device):
        self.append(cuda_graphs.CallRecorder())
        return self[-1]


@pytest.fixture
def recorders(monkeypatch):
    """Runs started after this act as they would on CUDA, with CallRecorder for CUDA graphs."""
    made = Recorders()
    monkeypatch.setattr(train, "recorder_for", made)
    return made


def param_groups(path):
    return read_checkpoint(path)["optimizer_state_dict"]["param_groups"]


def test_a_replayed_step_matches_the_eager_step_bit_for_bit(tmp_path, recorders):
    # two micro-batches per step, and a learning rate that changes at every one of the 10 steps
    data = write_corpus(tmp_path)
    flags = dict(grad_accum_steps=2, warmup_iters=3, max_iters=10, log_iter=1, eval_iter=10,
                 save_iter=10)
    train.train(tiny_argv(tmp_path / "graphed", data, **flags))
    train.train(tiny_argv(tmp_path / "eager", data, cuda_graphs="false", **flags))

    assert recorders[0].recordings == 1  # after 3 warm-up steps; the changing rate needs no other
    assert recorders[1].recordings == 0  # --cuda_graphs false: the eager step throughout
    graphed, eager = logged_steps(tmp_path / "graphed"), logged_steps(tmp_path / "eager")
    assert len(graphed) == 10 and graphed == eager  # losses and rates, step by step
    assert len({rate for _, _, rate in graphed}) == 9  # the peak rate lasts two steps
    assert_same_run_state(tmp_path / "graphed" / "gpt_step10.pt", tmp_path / "eager" / "gpt_step10.pt")


def test_resume_is_exact_from_graphed_to_eager_steps_and_back(tmp_path, recorders):
    data = write_corpus(tmp_path)
    train.train(tiny_argv(tmp_path / "eager", data, cuda_graphs="false"))  # 8 steps, saves 4 and 8
    train.train(tiny_argv(tmp_path / "graphed", data))
    train.train(tiny_argv(tmp_path / "graphed_then_eager", data, cuda_graphs="false",
                          resume=tmp_path / "graphed" / "gpt_step4.pt"))
    train.train(tiny_argv(tmp_path / "eager_then_graphed", data, cuda_graphs="true",
                          resume=tmp_path / "eager" / "gpt_step4.pt"))

    assert [r.recordings for r in recorders] == [0, 1, 0, 1]
    reference = tmp_path / "eager" / "gpt_step8.pt"
    for name in ("graphed", "graphed_then_eager", "eager_then_graphed"):
        assert_same_run_state(tmp_path / name / "gpt_step8.pt", reference)


def test_a_checkpoint_moves_between_the_graph_ready_optimizer_and_the_plain_one(
        tmp_path, monkeypatch):
    data = write_corpus(tmp_path)
    graph_ready = Recorders()
    monkeypatch.setattr(train, "recorder_for", graph_ready)
    train.train(tiny_argv(tmp_path / "graphed", data))
    monkeypatch.undo()  # the plain CPU optimizer: float rates, not capturable
    train.train(tiny_argv(tmp_path / "plain", data))
    train.train(tiny_argv(tmp_path / "graphed_then_plain", data,
                          resume=tmp_path / "graphed" / "gpt_step4.pt"))
    monkeypatch.setattr(train, "recorder_for", graph_ready)
    train.train(tiny_argv(tmp_path / "plain_then_graphed", data,
                          resume=tmp_path / "plain" / "gpt_step4.pt"))

    for name, tensor_rates in (("graphed", True), ("plain", False), ("graphed_then_plain", False),
                               ("plain_then_graphed", True)):
        for group in param_groups(tmp_path / name / "gpt_step8.pt"):
            assert isinstance(group["lr"], torch.Tensor) is tensor_rates, name
            assert group["capturable"] is tensor_rates, name
    assert graph_ready[-1].recordings == 1  # the resumed graph-ready run recorded its step
    # A float32 tensor rate and a Python float round the schedule differently: the resumed runs
    # agree with the uninterrupted ones to that rounding, not bit for bit.
    for resumed, whole in (("graphed_then_plain", "graphed"), ("plain_then_graphed", "plain")):
        resumed_weights = checkpoint_weights(tmp_path / resumed / "gpt_step8.pt")
        whole_weights = checkpoint_weights(tmp_path / whole / "gpt_step8.pt")
        torch.testing.assert_close(resumed_weights, whole_weights, rtol=1e-5, atol=1e-6)


def test_a_resume_in_the_same_process_records_the_step_again(tmp_path, recorders):
    data = write_corpus(tmp_path)
    gpt_config, train_config, _ = train.configure(tiny_argv(tmp_path / "run", data))
    run = train.build_run(gpt_config, train_config, setup_runtime(train_config))
    train.run_loop(run)  # 8 steps: 3 warm-up, recorded at step 4, replayed to step 8
    first_pass = read_checkpoint(tmp_path / "run" / "gpt_step8.pt")

    halfway = tmp_path / "run" / "gpt_step4.pt"
    run.train_config.resume = str(halfway)
    train.resume(run, load_checkpoint(halfway))  # new optimizer state: the recording is stale
    train.run_loop(run)

    assert recorders[0].recordings == 2
    second_pass = read_checkpoint(tmp_path / "run" / "gpt_step8.pt")
    for key in RUN_STATE_KEYS:
        assert_equal_nested(first_pass[key], second_pass[key], key)


class FailingRecorder(cuda_graphs.CallRecorder):
    """A recorder whose recording fails, as a CUDA graph does when a kernel cannot be captured."""

    def record(self, step_function):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_note(tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    monkeypatch.setattr(train, "recorder_for", lambda device: FailingRecorder())
    train.train(tiny_argv(tmp_path / "unrecordable", data))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: the training step could not be recorded as a CUDA graph (RuntimeError: "
                     "operation not permitted when stream is capturing); it runs eagerly from "
                     "here on"]
    train.train(tiny_argv(tmp_path / "eager", data, cuda_graphs="false"))
    assert_same_run_state(tmp_path / "unrecordable" / "gpt_step8.pt",
                      tmp_path / "eager" / "gpt_step8.pt")


@pytest.mark.parametrize("flags, dtype, world_size", [
    (dict(cuda_graphs=False), torch.bfloat16, 1),
    ({}, torch.float16, 1),
    ({}, torch.bfloat16, 2),
    (dict(skip_nonfinite=3), torch.bfloat16, 1),
    (dict(optimizer="muon"), torch.bfloat16, 1),
])
def test_graphs_fall_back_to_the_eager_step_where_they_cannot_work(flags, dtype, world_size):
    runtime = SimpleNamespace(dtype=dtype, distributed=world_size > 1)
    parallel = make_parallel(TrainConfig(**flags), runtime)
    assert cuda_graphs.graph_fallback(TrainConfig(**flags), runtime, parallel)
    run = SimpleNamespace(train_config=TrainConfig(**flags), runtime=runtime, parallel=parallel)
    assert train.graphed_step_for(run, cuda_graphs.CallRecorder()) is None


def test_graphs_are_used_with_bfloat16_float32_and_compile_and_never_off_cuda():
    for flags, dtype in (({}, torch.bfloat16), ({}, torch.float32),
                         (dict(compile=True), torch.bfloat16)):
        runtime = SimpleNamespace(dtype=dtype, distributed=False)
        parallel = make_parallel(TrainConfig(**flags), runtime)
        assert cuda_graphs.graph_fallback(TrainConfig(**flags), runtime, parallel) == ""
    assert cuda_graphs.recorder_for(torch.device("cpu")) is None


# --------------------------------------------------------------------------------- fused loss

def loss_and_gradients(model, x, y, dtype, return_logits, forward=None):
    """The loss of `forward` (by default the model itself) and the model's weights' gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        output = (model if forward is None else forward)(input_ids=x, labels=y,
                                                         return_logits=return_logits)
    output.loss.backward()
    return output, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, loss_tolerance, gradient_tolerance", [
    (torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-3, 2e-2)])
def test_the_fused_loss_matches_the_plain_loss_and_its_gradients(
        monkeypatch, dtype, loss_tolerance, gradient_tolerance):
    # 4 chunks of 13 rows, and one of 12
    monkeypatch.setattr(model_module, "CHUNK_ELEMENTS", 64 * 16)
    model = tiny_model(vocab_size=64, n_layer=1).train()
    x, y = torch.randint(0, 64, (2, 4, 16))
    y[0, :5] = -100  # positions that are not scored
    plain, plain_gradients = loss_and_gradients(model, x, y, dtype, return_logits=True)
    fused, fused_gradients = loss_and_gradients(model, x, y, dtype, return_logits=False)

    assert fused.logits is None
    assert fused.loss.dtype == torch.float32
    assert abs(fused.loss.item() - plain.loss.item()) < loss_tolerance
    for name, gradient in plain_gradients.items():  # the tied head's rows reach the embedding
        scale = gradient.abs().max()
        assert (fused_gradients[name] - gradient).abs().max() <= gradient_tolerance * scale, name
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        scored = model(input_ids=x, labels=y, return_logits=False).loss  # scoring: no gradients
    assert scored.item() == fused.loss.item()


def test_the_fused_loss_leaves_padded_ids_out_as_the_plain_loss_does():
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32),
                        vocab_limit=50).train()  # ids 50 to 63 only pad the vocabulary
    x, y = torch.randint(0, 50, (2, 4, 16))
    plain, plain_gradients = loss_and_gradients(model, x, y, torch.float32, return_logits=True)
    fused, fused_gradients = loss_and_gradients(model, x, y, torch.float32, return_logits=False)
    assert fused.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)
    torch.testing.assert_close(fused_gradients, plain_gradients)


@pytest.mark.slow
def test_the_fused_loss_traces_into_one_compiled_graph(monkeypatch):
    # "aot_eager" runs Dynamo and AOTAutograd for real and skips code generation: fast on a CPU
    monkeypatch.setattr(model_module, "CHUNK_ELEMENTS", 64 * 32)  # two chunks
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=generator, requires_grad=True)
    weight = torch.randn(64, 32, generator=generator, requires_grad=True)
    labels = torch.randint(0, 64, (64,), generator=generator)
    compiled = torch.compile(model_module.linear_cross_entropy, backend="aot_eager", fullgraph=True)
    results = []
    for function in (model_module.linear_cross_entropy, compiled):  # fullgraph: no graph breaks
        loss = function(hidden, weight, labels, torch.float32)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    torch.testing.assert_close(results[1], results[0])
