"""The optimizers and the learning-rate schedule.

- `--optimizer adamw` (the default): AdamW on every parameter, betas 0.9, 0.95 by default;
- `--optimizer muon`: Muon on the 2-D matrices inside the blocks, AdamW on everything else
  (embeddings, the head, norm gains, biases), in one `MuonWithAdamW` optimizer, so the loop, the
  gradient scaler and a checkpoint see one optimizer with one state_dict.
Weight decay applies to matrices and embeddings only. The schedule (a linear warmup, then a
cosine decay, as a `LambdaLR`) is a multiplier of each group's base rate, so every group follows
the same warmup and decay. Where the training step is recorded as a CUDA graph (step.py), AdamW
is `capturable` and each group's learning rate a device tensor that the schedule fills in place,
so replays follow the schedule; `load_optimizer_state` lets a checkpoint written in either form
resume in the other, and `rebase_schedule` fits a resumed schedule to this run's flags. Shared
by train.py, step.py and the benchmarks; when to step is train.py's job.
"""

import math

import torch

# The quintic Newton-Schulz coefficients of Keller Jordan's Muon, chosen for the steepest slope at
# zero: five steps bring every singular value into about [0.7, 1.2], which is as good as exactly 1.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def configure_optimizer(model, train_config, capturable=False):
    """AdamW, or with --optimizer muon, Muon for the blocks' matrices and AdamW for the rest.

    `capturable`: AdamW ready to be recorded in a CUDA graph, its learning rate a device tensor.
    """
    t = train_config
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "muon":
        hidden = [p for name, p in named if p.dim() == 2 and name.startswith("blocks.")]
        others = [p for _, p in named if not any(p is h for h in hidden)]
        return MuonWithAdamW(
            [{"params": hidden, "muon": True, "lr": t.muon_learning_rate,
              "weight_decay": t.muon_weight_decay},
             *adamw_groups(others, t.weight_decay)],
            lr=t.learning_rate, betas=tuple(t.betas), momentum=t.muon_momentum)
    groups = adamw_groups([p for _, p in named], t.weight_decay)
    learning_rate = t.learning_rate
    if capturable:
        # float32, which the fused kernel reads; the schedule multiplies the exact base rate
        # ("initial_lr", a float), so that no step waits on the device to compute its rate
        groups = [dict(group, initial_lr=learning_rate) for group in groups]
        learning_rate = torch.tensor(learning_rate, device=named[0][1].device)
    options = dict(lr=learning_rate, betas=tuple(t.betas), capturable=capturable)
    try:  # the fused kernel is one launch for all parameters, where this device has it
        return torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:
        return torch.optim.AdamW(groups, **options)


def adamw_groups(parameters, weight_decay):
    """Weight decay on matrices and embeddings only, never on biases or norm gains."""
    return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]


def base_learning_rates(optimizer, train_config):
    """Each group's peak learning rate under this run's flags: what the schedule multiplies."""
    return [train_config.muon_learning_rate if group.get("muon") else train_config.learning_rate
            for group in optimizer.param_groups]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked `"muon": True`, AdamW for the others.

    Muon (Keller Jordan, 2024) keeps SGD's Nesterov momentum of each matrix's gradient, then
    replaces that update by the nearest semi-orthogonal matrix, so every direction the matrix can
    learn moves at the same rate instead of the few that dominate the gradient. It is meant for
    hidden matrices; embeddings, the head and vectors keep AdamW.

    Written here rather than taken from `torch.optim.Muon`, which runs the Newton-Schulz
    iteration one matrix at a time and in bfloat16 on every device: on a CPU without bfloat16
    units that was about ten times slower than float32. Here the matrices of one shape go through
    together (a tall one as its transpose), in bfloat16 only where that is faster
    (`newton_schulz_dtype`). One step over the CPU speedrun model's 16 matrices, on a 2-core CPU
    with AVX512-BF16: 12.6 ms here, 16.3 ms with torch.optim.Muon (benchmarks/bench_muon.py).
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
        """Each parameter's state tensors `names`, created as zeros on first use."""
        for p in parameters:
            for name in names:
                if name not in self.state[p]:
                    self.state[p][name] = torch.zeros_like(p)
        return [[self.state[p][name] for p in parameters] for name in names]

    def _muon_step(self, group, parameters):
        momentum, lr = group["momentum"], group["lr"]
        grads = [p.grad for p in parameters]
        (buffers,) = self._state(parameters, "momentum_buffer")
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov: look one step ahead
        if group["weight_decay"]:
            torch._foreach_mul_(parameters, 1 - lr * group["weight_decay"])
        # one batched iteration per shape; a tall matrix joins the wide ones as its transpose
        by_shape = {}
        for p, update in zip(parameters, updates):
            tall = p.size(0) > p.size(1)
            by_shape.setdefault(tuple(sorted(p.shape)), []).append(
                (p, update.mT if tall else update, tall))
        for triples in by_shape.values():
            stacked = newton_schulz(torch.stack([update for _, update, _ in triples]),
                                    group["newton_schulz_steps"])
            matrices, orthogonal, rates = [], [], []
            for (p, _, tall), update in zip(triples, stacked.unbind(0)):
                matrices.append(p)
                orthogonal.append(update.mT if tall else update)
                # a tall matrix's orthogonal update has a smaller RMS per entry: scale it back up
                rates.append(-lr * (p.size(0) / p.size(1)) ** 0.5 if tall else -lr)
            torch._foreach_add_(matrices, torch._foreach_mul(orthogonal, rates))

    def _adamw_step(self, group, parameters):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        grads = [p.grad for p in parameters]
        exp_avgs, exp_avg_sqs = self._state(parameters, "exp_avg", "exp_avg_sq")
        step = self.state[parameters[0]].get("step", 0) + 1
        for p in parameters:
            self.state[p]["step"] = step
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


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps,
                                    min_lr_ratio=0.0):
    """Linear warmup to the peak, then a cosine down to `min_lr_ratio` of it at the last step.

    The multiplier for optimizer step s (counting from 0) is (s + 1) / warmup during warmup, so
    the very first step already learns, and the peak is reached at the last warmup step.
    """
    def multiplier(step):
        if step < num_warmup_steps:
            return (step + 1) / num_warmup_steps
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def rebase_schedule(optimizer, scheduler, train_config, step):
    """After a resume: the schedule follows this run's flags from `step` on (a larger --max_iters
    or another --learning_rate reshapes the rest of it), and each group's rate is the one the
    schedule gives for the next step."""
    scheduler.base_lrs = base_learning_rates(optimizer, train_config)
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
        set_learning_rate(group, base_lr * multiplier(step))


def current_learning_rate(scheduler):
    """The first group's learning rate for the coming step, computed on the host."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)


def set_learning_rate(group, rate):
    """Set a group's rate; a tensor rate (one a recorded graph holds) is filled in place."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(rate)
    else:
        group["lr"] = rate


def load_optimizer_state(optimizer, state_dict, load=None):
    """Load a saved state, keeping this optimizer's form of the rate (tensor or float) and its
    `capturable` flag: a checkpoint written with CUDA graphs resumes without them and vice versa.

    `load(state_dict)` loads it, by default `optimizer.load_state_dict` (a sharded checkpoint's
    comes from sharded_checkpoint.py)."""
    own = [(group["lr"], group.get("capturable")) for group in optimizer.param_groups]
    (load or optimizer.load_state_dict)(state_dict)
    for group, (rate, capturable) in zip(optimizer.param_groups, own):
        saved = float(group["lr"])  # a checkpoint is loaded to the CPU: no device sync
        group["lr"] = rate
        if capturable is not None:
            group["capturable"] = capturable
        set_learning_rate(group, saved)
