"""The optimizers and the learning-rate schedule.

- `--optimizer adamw` (the default): AdamW on every parameter, betas 0.9, 0.95 by default;
- `--optimizer muon`: Muon on the 2-D matrices inside the blocks, AdamW on everything else
  (embeddings, the head, norm gains, biases), in one `MuonWithAdamW` optimizer, so the loop, the
  gradient scaler and a checkpoint see one optimizer with one state_dict.
Weight decay applies to matrices and embeddings only. The schedule (`Schedule`: a linear warmup,
then a cosine decay, or with --lr_schedule wsd the peak held and a decay at the end, as a
`LambdaLR`) is a multiplier of each group's base rate, so every group follows the same warmup and
decay; a resumed run keeps the end of a decay that has begun (`resumed_decay_iters`), and
`describe_schedule` says in one line what the rate does for the steps ahead. Where the training
step is recorded as a CUDA graph (cuda_graphs.py), AdamW is `capturable` and each group's learning rate
a device tensor that the schedule fills in place, so replays follow the schedule;
`load_optimizer_state` lets a checkpoint written in either form resume in the other, and
`rebase_schedule` fits a resumed schedule to this run's flags. Shared by train.py,
step_checkpoint.py and the benchmarks; when to step is train.py's job.
"""

import dataclasses
import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Schedule:
    """The multiplier of each group's peak rate for optimizer step s (counting from 0).

    Both kinds warm up linearly, (s + 1) / warmup, so the very first step already learns and the
    peak is reached at the last warmup step, and both end at `min_lr_ratio` at step `decay_iters`
    (--lr_decay_iters, or --max_iters), where they stay:
    - cosine: from the end of warmup, a cosine from the peak down to the floor;
    - wsd (warmup-stable-decay): the peak held, then over the last `decay_fraction` of the steps
      a decay shaped 1 - sqrt(progress). Hagele et al. (2024, "Scaling Laws and Compute-Optimal
      Training Beyond Fixed Training Durations") found this shape ends lower than a linear decay,
      on a par with a cosine: it drops fast at first and spends its last steps near the floor.
      Until its decay begins, a WSD run is the same whatever its length, which is what lets a run
      be extended as if it had been started longer (see `resumed_decay_iters`).
    """

    kind: str  # cosine or wsd: --lr_schedule
    warmup_iters: int
    decay_iters: int  # the step at which the decay reaches min_lr_ratio
    min_lr_ratio: float
    decay_fraction: float  # wsd only

    @classmethod
    def from_config(cls, train_config):
        t = train_config
        return cls(t.lr_schedule, t.warmup_iters, t.lr_decay_iters or t.max_iters, t.min_lr_ratio,
                   t.decay_fraction)

    @property
    def decay_start(self):
        """The first step whose rate is below the peak (after warmup)."""
        if self.kind == "wsd":
            decay_steps = round(self.decay_fraction * self.decay_iters)
            return max(self.warmup_iters, self.decay_iters - decay_steps)
        return self.warmup_iters

    def __call__(self, step):
        if step < self.warmup_iters:
            return (step + 1) / self.warmup_iters
        start = self.decay_start
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.decay_iters - start))
        if self.kind == "wsd":
            remaining = 1.0 - math.sqrt(progress)
        else:
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * remaining


def learning_rate_scheduler(optimizer, schedule):
    """A `LambdaLR` that multiplies each group's peak rate by `schedule(step)`.

    The multiplier is a plain function, so the scheduler's state_dict holds the step and the
    peaks only: the shape always comes from the run's flags (`rebase_schedule`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def resumed_decay_iters(saved_config, train_config, step):
    """The --lr_decay_iters of a run resumed after `step` when the flag is not given.

    A decay that has begun keeps the end it had, so extending a run never raises its rate: the
    extra steps run at the floor (nanoGPT's fixed lr_decay_iters). A WSD run that is before its
    decay, under its old length and its new one, has held the peak so far whatever its length:
    its decay moves to the end of the new --max_iters (0), so it ends exactly as a run started
    with that --max_iters. 0 is returned wherever the end is --max_iters anyway.
    """
    saved = Schedule.from_config(saved_config)
    if saved_config.lr_decay_iters == 0 and saved.kind == train_config.lr_schedule == "wsd":
        extended = Schedule.from_config(dataclasses.replace(train_config, lr_decay_iters=0))
        if step < saved.decay_start and step < extended.decay_start:
            return 0
    return 0 if saved.decay_iters == train_config.max_iters else saved.decay_iters


def rebase_schedule(optimizer, scheduler, train_config, step):
    """After a resume: the schedule follows this run's flags from `step` on (another
    --learning_rate, or --max_iters and --lr_decay_iters as `resumed_decay_iters` settles them,
    reshape the rest of it), and each group's rate is the one the schedule gives for the next
    step."""
    scheduler.base_lrs = base_learning_rates(optimizer, train_config)
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
        set_learning_rate(group, base_lr * multiplier(step))


def schedule_changes(saved_config, train_config):
    """Whether a resume changes the rates of the steps ahead: their number, shape or peaks."""
    fields = ("max_iters", "learning_rate", "muon_learning_rate", "optimizer")
    return Schedule.from_config(saved_config) != Schedule.from_config(train_config) or \
        any(getattr(saved_config, name) != getattr(train_config, name) for name in fields)


def describe_schedule(train_config, step, saved_config=None):
    """One line: what the learning rate does over steps step + 1 to --max_iters, and why its
    decay ends where it does (`saved_config`: the run it resumes)."""
    t, schedule = train_config, Schedule.from_config(train_config)
    end, warmup = t.max_iters, schedule.warmup_iters

    def rate(s):
        return f"{t.learning_rate * schedule(s):.2e}"

    phases = []
    if step < warmup:
        phases.append(f"a warmup to {rate(warmup - 1)} at step {min(warmup, end)}")
    if max(step, warmup) < min(schedule.decay_start, end):
        phases.append(f"constant at {rate(max(step, warmup))} to step "
                      f"{min(schedule.decay_start, end)}")
    decay_from, decay_to = max(step, schedule.decay_start), min(schedule.decay_iters, end)
    if decay_from < decay_to:
        shape = "1-sqrt" if schedule.kind == "wsd" else "cosine"
        phases.append(f"a {shape} decay from {rate(decay_from)} to {rate(decay_to)} at step "
                      f"{decay_to}")
    if max(step, schedule.decay_iters) < end:
        phases.append(f"the minimum, {rate(end)}, to step {end}")
    muon = (f" (muon_lr in proportion, from {t.muon_learning_rate:g})" if t.optimizer == "muon"
            else "")
    return (f"learning rate for steps {step + 1}-{end}: {', then '.join(phases)}{muon}; "
            f"{decay_reason(t, schedule, saved_config)}")


def decay_reason(train_config, schedule, saved_config=None):
    """Why the decay ends at schedule.decay_iters, and how to move it."""
    t = train_config
    if t.lr_decay_iters == 0 and schedule.kind == "wsd":
        return (f"the decay is the last {t.decay_fraction:g} of --max_iters {t.max_iters}, as in "
                f"a run started with it")
    if t.lr_decay_iters == 0:
        return f"the decay ends at --max_iters {t.max_iters}"
    saved = Schedule.from_config(saved_config) if saved_config else None
    if saved and saved.decay_iters == t.lr_decay_iters:
        return (f"the decay ends at step {t.lr_decay_iters} as in the run it resumes (give "
                f"--lr_decay_iters {t.max_iters} to end it at --max_iters instead)")
    return f"the decay ends at step {t.lr_decay_iters} (--lr_decay_iters {t.lr_decay_iters})"


def current_learning_rates(scheduler):
    """The rates of the coming step under their record names, computed on the host: `lr` for
    AdamW's groups and, with --optimizer muon, `muon_lr` for Muon's."""
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    rates = {}
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        rates.setdefault("muon_lr" if group.get("muon") else "lr", base_lr * multiplier)
    return dict(sorted(rates.items()))  # lr first


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
