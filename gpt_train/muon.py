"""Muon, and its Newton-Schulz work shared among the ranks.

- `MuonWithAdamW`: Muon for the groups marked `"muon": True`, AdamW for the others, in one
  optimizer (which groups get which is optim.py's `configure_optimizer`);
- `newton_schulz` and `orthogonalise`: the iteration, batched over matrices of one shape;
- `NewtonSchulzWork`: which rank orthogonalises which matrix. Whole matrices, the largest first,
  each to the rank with the least work so far, counted in FLOPs; `describe` is the start line.
Where the work goes follows where the gradients are:
- one process: every matrix here, as in Keller Jordan's Muon;
- --parallel ddp: DDP's all-reduce leaves every whole gradient on every rank. Every rank keeps
  the momentum of every matrix (an elementwise update, cheap next to Newton-Schulz), so a step
  checkpoint, which rank 0 writes alone, holds it all and resumes with any number of ranks; each
  rank orthogonalises only its own matrices, and one all-gather brings every update to every rank;
- --parallel fsdp: each rank holds rows of every gradient (FSDP2 shards dim 0). The momentum is
  kept in slices beside the parameter's, so sharded checkpoints hold it as they hold AdamW's
  moments; one all-to-all sends each matrix's rows to the rank that owns it, which
  orthogonalises it whole, and a second sends each rank its rows of the result.
Updates travel in the dtype Newton-Schulz computes in on a GPU, bfloat16, and in float32
elsewhere: casting before or after the journey gives the same bits, so a shared step rounds as
one process's does. How the model is spread over the ranks is parallel.py's business.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# The quintic Newton-Schulz coefficients of Keller Jordan's Muon, chosen for the steepest slope at
# zero: five steps bring every singular value into about [0.7, 1.2], which is as good as exactly 1.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def local_tensor(tensor):
    """This rank's part of a tensor: its slice if it is sharded, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked `"muon": True`, AdamW for the others.

    Muon (Keller Jordan, 2024) keeps SGD's Nesterov momentum of each matrix's gradient, then
    replaces that update by the nearest semi-orthogonal matrix, so every direction the matrix can
    learn moves at the same rate instead of the few that dominate the gradient. It is meant for
    hidden matrices; embeddings, the head and vectors keep AdamW.

    Written here rather than taken from `torch.optim.Muon`, which runs the Newton-Schulz
    iteration one matrix at a time and in bfloat16 on every device, several times slower than
    float32 on a CPU without bfloat16 units (docs/performance.md). Here the matrices of one shape
    go through together (a tall one as its transpose), in bfloat16 only where that is faster
    (`newton_schulz_dtype`), and under torchrun each rank orthogonalises its share only.
    Parameters may be FSDP's DTensors: every update works on this rank's slice.
    """

    def __init__(self, param_groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                 newton_schulz_steps=5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum,
                        newton_schulz_steps=newton_schulz_steps, muon=False)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            parameters = [p for p in group["params"] if p.grad is not None]
            if parameters:
                (self._muon_step if group["muon"] else self._adamw_step)(group, parameters)
        return loss

    def _state(self, parameters, *names):
        """This rank's part of each parameter's state tensors `names`, created as zeros (sharded
        as the parameter is) on first use."""
        for p in parameters:
            for name in names:
                if name not in self.state[p]:
                    self.state[p][name] = torch.zeros_like(p)
        return [[local_tensor(self.state[p][name]) for p in parameters] for name in names]

    def _muon_step(self, group, parameters):
        momentum, lr = group["momentum"], group["lr"]
        grads = [local_tensor(p.grad) for p in parameters]
        (buffers,) = self._state(parameters, "momentum_buffer")
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov: look one step ahead
        matrices = [local_tensor(p) for p in parameters]
        if group["weight_decay"]:
            torch._foreach_mul_(matrices, 1 - lr * group["weight_decay"])
        orthogonal = self._orthogonalised(parameters, updates, group["newton_schulz_steps"])
        # a tall matrix's orthogonal update has a smaller RMS per entry: scale it back up
        rates = [-lr * (p.size(0) / p.size(1)) ** 0.5 if p.size(0) > p.size(1) else -lr
                 for p in parameters]
        torch._foreach_add_(matrices, torch._foreach_mul(orthogonal, rates))

    def _orthogonalised(self, parameters, updates, steps):
        """This rank's part of each update (the whole matrix, or under FSDP its rows), made
        orthogonal by whichever rank owns the matrix."""
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size == 1:
            return orthogonalise(updates, steps)
        work = NewtonSchulzWork.balanced([tuple(p.shape) for p in parameters], world_size, steps)
        if isinstance(parameters[0], DTensor):
            check_row_slices(parameters, work)
            return orthogonalise_row_slices(updates, work)
        return orthogonalise_whole(updates, work)

    def _adamw_step(self, group, parameters):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        grads = [local_tensor(p.grad) for p in parameters]
        exp_avgs, exp_avg_sqs = self._state(parameters, "exp_avg", "exp_avg_sq")
        # a tensor, as torch's AdamW keeps it: sharded checkpoints hold tensors only
        step = int(self.state[parameters[0]].get("step", 0)) + 1
        for p in parameters:
            self.state[p]["step"] = torch.tensor(float(step))
        parameters = [local_tensor(p) for p in parameters]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(parameters, 1 - lr * group["weight_decay"])
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(parameters, exp_avgs, denominators,
                                value=-lr / (1 - beta1 ** step))


def newton_schulz(matrices, steps, dtype=None):
    """An approximately semi-orthogonal matrix for each of `matrices` (batch, rows, columns):
    the same singular vectors, every singular value near 1. Computed in `dtype`, by default the
    faster one for these matrices (`newton_schulz_dtype`)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrices.to(dtype or newton_schulz_dtype(matrices))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x @ x.T is the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        # x <- a x + (b G + c G^2) x with G = x x^T; baddbmm folds each sum into its product,
        # a third less time than separate multiplies and adds on a CPU, and fewer launches
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(matrices.dtype)


def newton_schulz_dtype(matrices):
    """bfloat16 where it is the faster: on CUDA, and on a CPU that multiplies bfloat16 natively
    (AVX512-BF16 or AMX) when the matrices' smaller side is at least 64. Measured on such a CPU,
    five iterations on 128 x 512 matrices take half the time of float32, and on 32 x 96 three
    times as long; without those units bfloat16 is emulated, several times slower everywhere."""
    if matrices.is_cuda:
        return torch.bfloat16
    if matrices.device.type == "cpu" and min(matrices.shape[-2:]) >= 64:
        native = (getattr(torch.cpu, name, lambda: False)()
                  for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        if any(native):
            return torch.bfloat16
    return torch.float32


def orthogonalise(matrices, steps):
    """`newton_schulz` of each of `matrices` (whole 2-D matrices), one batched iteration per
    shape: a tall matrix joins the wide ones of its sides as its transpose."""
    by_shape = {}
    for index, matrix in enumerate(matrices):
        tall = matrix.size(0) > matrix.size(1)
        by_shape.setdefault(tuple(sorted(matrix.shape)), []).append(
            (index, tall, matrix.mT if tall else matrix))
    results = [None] * len(matrices)
    for entries in by_shape.values():
        stacked = newton_schulz(torch.stack([matrix for _, _, matrix in entries]), steps)
        for (index, tall, _), result in zip(entries, stacked.unbind(0)):
            results[index] = result.mT if tall else result
    return results


def newton_schulz_flops(shape, steps):
    """The FLOPs of `steps` iterations on one matrix of `shape` (a multiply-add counts 2): with
    m <= n its sides, each iteration multiplies an m x n matrix by its transpose (2 m^2 n), the
    m x m result by itself (2 m^3), and the matrix by an m x m polynomial of it (2 m^2 n)."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


@dataclass(frozen=True)
class NewtonSchulzWork:
    """Which rank orthogonalises each of Muon's matrices: whole matrices, balanced by FLOPs."""

    shapes: tuple  # each matrix's (rows, columns), in the optimizer's order
    owners: tuple  # the rank that orthogonalises each
    world_size: int
    steps: int  # Newton-Schulz iterations per matrix

    @classmethod
    def balanced(cls, shapes, world_size, steps):
        """The largest matrix first, each to the rank with the fewest FLOPs so far (the lowest
        rank among equals): Graham's longest-processing-time rule, never a third above the
        best split there is, and even when each shape's matrices divide among the ranks. It
        depends on the shapes alone, so every rank computes the same."""
        loads, owners = [0] * world_size, [0] * len(shapes)
        for index in sorted(range(len(shapes)),
                            key=lambda i: -newton_schulz_flops(shapes[i], steps)):
            rank = loads.index(min(loads))
            owners[index] = rank
            loads[rank] += newton_schulz_flops(shapes[index], steps)
        return cls(tuple(map(tuple, shapes)), tuple(owners), world_size, steps)

    def owned_by(self, rank):
        """The indices of the matrices `rank` orthogonalises, in the optimizer's order."""
        return [index for index, owner in enumerate(self.owners) if owner == rank]

    def flops(self, rank):
        return sum(newton_schulz_flops(self.shapes[index], self.steps)
                   for index in self.owned_by(rank))

    def describe(self, sharded=False):
        """The start line: how many matrices and FLOPs each rank orthogonalises per step;
        `sharded`: the ranks hold slices of the matrices (FSDP), not whole ones (DDP)."""
        total = sum(newton_schulz_flops(shape, self.steps) for shape in self.shapes)
        line = (f"Newton-Schulz (Muon): {len(self.shapes)} matrices, "
                f"{format_flops(total)} per step")
        if self.world_size == 1:
            return f"{line}, all in this process"
        how = ("each matrix's rows go to its owner and back, all-to-all" if sharded else
               "the updates are all-gathered")
        counts = sorted(len(self.owned_by(rank)) for rank in range(self.world_size))
        flops = sorted(self.flops(rank) for rank in range(self.world_size))
        imbalance = flops[-1] / (total / self.world_size) - 1
        uneven = f", the busiest {imbalance:.0%} above an even share" if imbalance >= 0.005 else ""
        return (f"{line}, shared by {self.world_size} ranks (whole matrices; {how}): "
                f"{_span(counts)} {'matrix' if counts == [1] * len(counts) else 'matrices'} and "
                f"{_span(flops, format_flops)} per rank{uneven}")


def _span(values, form=str):
    """Sorted `values` as one figure, or as a range 'smallest to largest' in one unit."""
    smallest, largest = form(values[0]), form(values[-1])
    if smallest == largest:
        return smallest
    unit = largest.partition(" ")[2]
    if unit and smallest.endswith(" " + unit):
        smallest = smallest.partition(" ")[0]
    return f"{smallest} to {largest}"


def format_flops(flops):
    for unit in ("", "k", "M", "G", "T", "P"):
        if flops < 999.5 or unit == "P":
            return f"{flops:.3g} {unit}FLOP"
        flops /= 1000


def work_line(optimizer, parallel):
    """The start line of a Muon run: where its Newton-Schulz work goes (`NewtonSchulzWork`)
    among the ranks of `parallel` (parallel.py's object)."""
    for group in optimizer.param_groups:
        if group.get("muon"):
            shapes = [tuple(p.shape) for p in group["params"]]
            work = NewtonSchulzWork.balanced(shapes, parallel.runtime.world_size,
                                             group["newton_schulz_steps"])
            return work.describe(parallel.sharded)
    return None


def wire_dtype(updates):
    """The dtype updates travel in: bfloat16 on a GPU, where Newton-Schulz casts them to it
    anyway, float32 elsewhere. Either way the cast gives the bits one process would have."""
    return torch.bfloat16 if updates[0].is_cuda else updates[0].dtype


def orthogonalise_whole(updates, work):
    """DDP: every rank holds every whole update; each orthogonalises its own matrices, and one
    all-gather (each rank's results end to end, padded to the busiest rank's) shares them."""
    rank, dtype = dist.get_rank(), wire_dtype(updates)
    results = orthogonalise([updates[index].to(dtype) for index in work.owned_by(rank)],
                            work.steps)
    sizes = [sum(math.prod(work.shapes[index]) for index in work.owned_by(owner))
             for owner in range(work.world_size)]
    largest = max(sizes)
    send = torch.zeros(largest, dtype=dtype, device=updates[0].device)
    if results:
        send[:sizes[rank]] = torch.cat([result.reshape(-1) for result in results])
    gathered = torch.empty(work.world_size * largest, dtype=dtype, device=send.device)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, send)
    shared = [None] * len(updates)
    for owner in range(work.world_size):
        pieces = split(gathered[owner * largest:][:sizes[owner]],
                       [work.shapes[index] for index in work.owned_by(owner)])
        for index, piece in zip(work.owned_by(owner), pieces):
            shared[index] = piece.to(updates[index].dtype)
    return shared


def orthogonalise_row_slices(updates, work):
    """FSDP: each rank holds rows of every update (`row_range`). One all-to-all gives each
    matrix whole to its owner, which orthogonalises it; a second sends each rank its rows."""
    rank, dtype, ranks = dist.get_rank(), wire_dtype(updates), range(work.world_size)
    owned, device = work.owned_by(rank), updates[0].device

    def rows_shape(index, holder):
        start, end = row_range(work.shapes[index][0], holder, work.world_size)
        return end - start, work.shapes[index][1]

    received = all_to_all([[updates[index] for index in work.owned_by(owner)] for owner in ranks],
                          [[rows_shape(index, holder) for index in owned] for holder in ranks],
                          dtype, device)
    whole = [torch.cat([received[holder][position] for holder in ranks])
             for position in range(len(owned))]
    results = orthogonalise(whole, work.steps)
    outgoing = [[result[slice(*row_range(result.size(0), holder, work.world_size))]
                 for result in results] for holder in ranks]
    returned = all_to_all(outgoing, [[rows_shape(index, rank) for index in work.owned_by(owner)]
                                     for owner in ranks], dtype, device)
    mine = [None] * len(updates)
    for owner in ranks:
        for index, piece in zip(work.owned_by(owner), returned[owner]):
            mine[index] = piece.to(updates[index].dtype)
    return mine


def row_range(rows, rank, world_size):
    """The rows [start, end) of a matrix that `rank` holds under FSDP2, which cuts dim 0 as
    `torch.chunk` does: ceil(rows / world_size) each, the last ranks fewer or none."""
    size = -(-rows // world_size)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def check_row_slices(parameters, work):
    """Every parameter's slice is the rows `row_range` says: the exchange relies on it."""
    rank = dist.get_rank()
    for p, shape in zip(parameters, work.shapes):
        start, end = row_range(shape[0], rank, work.world_size)
        if p.to_local().shape != (end - start, shape[1]):
            raise RuntimeError(f"Muon expects FSDP to hold rows {start} to {end} of a {shape} "
                               f"matrix on rank {rank}, but it holds {tuple(p.to_local().shape)}")


def all_to_all(outgoing, incoming, dtype, device):
    """Send the tensors `outgoing[r]` to rank r, and receive from each rank r tensors of the
    shapes `incoming[r]`, in one collective over flat buffers on `device`; returns them per rank."""
    flat = [t.reshape(-1).to(dtype) for pieces in outgoing for t in pieces]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    receive_sizes = [sum(math.prod(shape) for shape in shapes) for shapes in incoming]
    receive = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(receive, send, receive_sizes,
                           [sum(t.numel() for t in pieces) for pieces in outgoing])
    received, offset = [], 0
    for shapes, size in zip(incoming, receive_sizes):
        received.append(split(receive[offset:offset + size], shapes))
        offset += size
    return received


def split(flat, shapes):
    """Consecutive pieces of the 1-D `flat`, viewed as `shapes`."""
    pieces, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        pieces.append(flat[offset:offset + size].view(shape))
        offset += size
    return pieces
