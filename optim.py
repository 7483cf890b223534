"""The optimizer and the learning-rate schedule: AdamW (betas 0.9, 0.95 by default) and a linear
warmup followed by a cosine decay, as a `LambdaLR`.

Shared by train.py and the benchmarks. Weight decay applies to matrices and embeddings only. The
schedule is a multiplier of each group's base rate, so every parameter group follows the same
warmup and decay. When to step them is train.py's business.
"""

import math

import torch


def configure_optimizer(model, train_config):
    """AdamW; weight decay on matrices and embeddings only, never on biases or LayerNorm gains."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": train_config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    options = dict(lr=train_config.learning_rate, betas=tuple(train_config.betas))
    try:  # the fused kernel is one launch for all parameters, where this device has it
        return torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:
        return torch.optim.AdamW(groups, **options)


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
