"""Muon on several ranks: each orthogonalises its share of the matrices (gpt_train/muon.py).

One torchrun launch runs Muon on 2 processes under ddp and under fsdp, each also resumed from a
step checkpoint, against one process with the same global batch; the sharing itself (who
orthogonalises what, and the exchanges of whole matrices and of FSDP's rows) runs on ranks
played by threads of this process, with 2 and 3 ranks and matrices whose rows do not split
evenly.
"""

import re
import threading

import pytest
import torch

import train
from conftest import (assert_same_weights, checkpoint_weights, metrics_records, read_checkpoint,
                      tiny_argv, write_corpus)
from gpt_train import muon
from gpt_train.muon import NewtonSchulzWork, newton_schulz_flops, orthogonalise, row_range

RANKS = dict(optimizer="muon", max_iters=6, save_iter=3, eval_iter=6, log_iter=1,
             grad_accum_steps=2, muon_weight_decay=0.1)


@pytest.fixture(scope="module")
def muon_ranks(tmp_path_factory):
    """Muon on 2 processes under ddp and under fsdp, each also resumed from its step-3
    checkpoint (all in one torchrun launch), and 1 process with the same global batch."""
    import torchrun_runs
    root = tmp_path_factory.mktemp("muon_ranks")
    data = write_corpus(root)
    argvs = []
    for parallel, step_checkpoint in (("ddp", "gpt_step3.pt"), ("fsdp", "gpt_step3")):
        argvs += [tiny_argv(root / parallel, data, batch_size=4, parallel=parallel, **RANKS),
                  ["--resume", root / parallel / step_checkpoint,
                   "--checkpoint_dir", root / f"{parallel}_resumed"]]
    launched = torchrun_runs.launch(argvs, root)
    assert launched.returncode == 0, launched.stderr[-3000:]
    train.train(tiny_argv(root / "one", data, batch_size=8, **RANKS))
    return root, launched.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_on_two_ranks_trains_like_one_process_with_the_same_global_batch(muon_ranks,
                                                                            parallel):
    """Each rank orthogonalises half the matrices, yet every logged loss and the final weights
    are one process's, up to float32 rounding: the ranks' gradients are summed in another order.
    (The attention's key biases, whose exact gradient is zero, differ most: AdamW scales their
    rounding noise up to full-size steps.)"""
    root, output = muon_ranks
    how = {"ddp": "the updates are all-gathered", "fsdp": "all-to-all"}[parallel]
    assert re.search(r"Newton-Schulz \(Muon\): 4 matrices, 9.18 MFLOP per step, shared by 2 "
                     rf"ranks \(whole matrices; [^)]*{how}\): 2 matrices and 3.93 to 5.24 MFLOP "
                     r"per rank, the busiest 14% above an even share", output)
    ours, one = metrics_records(root / parallel), metrics_records(root / "one")
    assert [r["step"] for r in ours] == [r["step"] for r in one] == list(range(1, 7))
    for mine, theirs in zip(ours, one):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    weights, reference = (checkpoint_weights(root / name / "gpt_final.pt")
                          for name in (parallel, "one"))
    assert weights.keys() == reference.keys()
    assert max((weights[k] - reference[k]).abs().max().item() for k in weights) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_muon_ranks_resumed_from_a_step_checkpoint_end_bit_for_bit_as_uninterrupted(
        muon_ranks, parallel):
    root, _ = muon_ranks
    assert_same_weights(root / f"{parallel}_resumed" / "gpt_final.pt",
                        root / parallel / "gpt_final.pt")
    later = [r["loss"] for r in metrics_records(root / parallel) if r["step"] > 3]
    assert [r["loss"] for r in metrics_records(root / f"{parallel}_resumed")] == later


@pytest.mark.slow
def test_a_sharded_muon_checkpoint_of_two_ranks_resumes_in_one_with_the_whole_momentum(
        muon_ranks, tmp_path, capsys):
    """FSDP's ranks each saved their rows of every momentum buffer; one process reads them back
    whole, and they are the momentum a DDP run (whose rank 0 saves it all) had at that step."""
    import torch.distributed as dist
    root, _ = muon_ranks
    gpt_config, train_config, checkpoint = train.configure(
        ["--resume", str(root / "fsdp" / "gpt_step3"), "--checkpoint_dir", str(tmp_path)])
    runtime = train.setup_runtime(train_config)
    try:
        run = train.build_run(gpt_config, train_config, runtime, checkpoint)
        train.resume(run, checkpoint)
        (muon,) = [group for group in run.optimizer.param_groups if group["muon"]]
        resumed = [run.optimizer.state[p]["momentum_buffer"].full_tensor()
                   for p in muon["params"]]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "written by 2 process(es) with --parallel fsdp" in capsys.readouterr().err
    saved = read_checkpoint(root / "ddp" / "gpt_step3.pt")["optimizer_state_dict"]["state"]
    assert len(resumed) == 4
    for index, momentum in enumerate(resumed):
        assert momentum.abs().max() > 0
        assert torch.allclose(momentum, saved[index]["momentum_buffer"], rtol=0, atol=1e-6)


def test_newton_schulz_work_goes_largest_first_to_the_least_loaded_rank():
    # GPT-2 124M: 12 layers of qkv, the attention's projection and the MLP's two matrices
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    work = NewtonSchulzWork.balanced(shapes, world_size=4, steps=5)
    assert [work.flops(rank) for rank in range(4)] == [work.flops(0)] * 4  # exactly even
    assert sorted(work.owners) == sorted(list(range(4)) * 12)
    assert work.describe() == (
        "Newton-Schulz (Muon): 48 matrices, 1.52 TFLOP per step, shared by 4 ranks (whole "
        "matrices; the updates are all-gathered): 12 matrices and 381 GFLOP per rank")
    assert newton_schulz_flops((2304, 768), 5) == 5 * (4 * 768 * 768 * 2304 + 2 * 768 ** 3)
    # the largest two go to ranks 0 and 1, then the next largest to the lighter of them
    uneven = NewtonSchulzWork.balanced([(96, 32), (32, 32), (128, 32), (32, 128)], 2, 5)
    assert uneven.owners == (0, 1, 0, 1)
    assert NewtonSchulzWork.balanced(shapes, 1, 5).describe(sharded=True) == \
        "Newton-Schulz (Muon): 48 matrices, 1.52 TFLOP per step, all in this process"


def test_the_rows_each_rank_holds_are_those_fsdp_cuts_with_torch_chunk():
    for rows, world_size in [(7, 3), (2, 3), (96, 4), (5, 4)]:
        chunks = torch.arange(rows).chunk(world_size)
        for rank in range(world_size):
            start, end = row_range(rows, rank, world_size)
            expected = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(start, end)) == expected


class ThreadRanks:
    """Ranks played by threads of this process, with the collectives muon.py calls: what each
    rank sends is put on a shared table, and every rank reads the table once all have written."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.table = [None] * world_size
        self.local = threading.local()

    def is_initialized(self):
        return True

    def get_world_size(self):
        return self.world_size

    def get_rank(self):
        return self.local.rank

    def _everyones(self, value):
        self.table[self.get_rank()] = value
        self.barrier.wait()
        everyone = list(self.table)
        self.barrier.wait()  # read by all before the next exchange overwrites it
        return everyone

    def all_gather_single(self, output, tensor):
        output.copy_(torch.cat(self._everyones(tensor.clone())))

    def all_to_all_single(self, output, tensor, output_split_sizes, input_split_sizes):
        sent = self._everyones(tensor.clone().split(input_split_sizes))
        output.copy_(torch.cat([pieces[self.get_rank()] for pieces in sent]))
        assert [pieces[self.get_rank()].numel() for pieces in sent] == output_split_sizes

    def run(self, function):
        """function(rank) on every rank at once; their results, by rank."""
        results, errors = [None] * self.world_size, []

        def play(rank):
            self.local.rank = rank
            try:
                results[rank] = function(rank)
            except BaseException as error:  # reported by the test, not lost in a thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=play, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_orthogonalises_only_its_matrices_and_every_rank_gets_every_update(
        monkeypatch, world_size):
    shapes = [(7, 5), (5, 7), (2, 3), (7, 5), (12, 4), (3, 3)]  # rows that split unevenly
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(shape, generator=generator) for shape in shapes]
    expected = orthogonalise(updates, steps=5)
    work = NewtonSchulzWork.balanced(shapes, world_size, steps=5)
    ranks = ThreadRanks(world_size)
    monkeypatch.setattr(muon, "dist", ranks)
    flops = [0] * world_size
    newton_schulz = muon.newton_schulz

    def counted(matrices, steps):
        flops[ranks.get_rank()] += len(matrices) * newton_schulz_flops(matrices.shape[1:], steps)
        return newton_schulz(matrices, steps)

    monkeypatch.setattr(muon, "newton_schulz", counted)
    # DDP: every rank holds every whole update and ends with every orthogonalised one
    for shared in ranks.run(lambda rank: muon.orthogonalise_whole(updates, work)):
        for result, reference in zip(shared, expected):
            assert torch.allclose(result, reference, rtol=0, atol=1e-6)
    assert flops == [work.flops(rank) for rank in range(world_size)]
    # FSDP: every rank holds rows of each update and ends with the same rows, orthogonalised

    def rows(matrix, rank):
        return matrix[slice(*row_range(matrix.size(0), rank, world_size))]

    sliced = ranks.run(lambda rank: muon.orthogonalise_row_slices(
        [rows(update, rank) for update in updates], work))
    for rank, mine in enumerate(sliced):
        for result, reference in zip(mine, expected):
            assert torch.allclose(result, rows(reference, rank), rtol=0, atol=1e-6)
    assert flops == [2 * work.flops(rank) for rank in range(world_size)]
    assert min(flops) > 0
