"""LoRA: fine-tune a large model in little memory by training small low-rank adapters only.

`add_lora(model, rank, alpha, dropout)` freezes every weight of a GPT and gives each linear layer
of its blocks (attention's qkv and output projections, the MLP's two) a trainable update
(alpha / rank) * B @ A of rank `rank`. B starts at zero, so training starts from the model exactly
as it was; only A and B reach the optimizer, so its state shrinks by orders of magnitude.
- A `LoRALinear` keeps the frozen `weight` and `bias` under their own names and adds `lora_A` and
  `lora_B`: a step checkpoint holds the plain keys plus the adapters, and resumes exactly;
- `merged_state_dict(model)` folds the adapters into the weights, giving the plain model's keys:
  what gpt_best.pt and gpt_final.pt hold, so sample.py, evaluate.py and export.py need nothing new;
- `merge_adapters(state_dict, alpha)` does the same to a step checkpoint's saved weights, with the
  same arithmetic (`merged_weight`): checkpoint.py calls it, so every command reads those too.
Written here rather than with `peft`, whose wrappers rename every key (`base_model.model. ...
.base_layer.weight`) and would make checkpoints undo that renaming on every save and load.
When to add adapters is train.py's business.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same tensors, frozen by add_lora
        options = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **options))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **options))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self):
        return merged_weight(self.weight, self.lora_A, self.lora_B, self.scale).detach()


def merged_weight(weight, lora_A, lora_B, scale):
    """The plain layer's weight that computes what the adapted one does (without dropout)."""
    return weight + scale * (lora_B @ lora_A)


def add_lora(model, rank, alpha, dropout=0.0):
    """Freeze `model` and put adapters on every nn.Linear inside its blocks (not the LM head)."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, child_name = name.rpartition(".")
                parent = block.get_submodule(parent_name)
                setattr(parent, child_name, LoRALinear(module, rank, alpha, dropout))
    return model


def merged_state_dict(model):
    """The plain model's state dict, adapters folded into their weights (without LoRA: as is)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            state[f"{name}.weight"] = module.merged_weight()
    return state


def merge_adapters(state_dict, alpha):
    """A saved LoRA state dict (plain keys plus each adapted layer's lora_A and lora_B) as the plain
    model's: each pair folded into the weight it adapts, scaled by alpha / rank as in training.
    A state dict without adapters comes back as it is; an incomplete pair is left for the model's
    load to name."""
    merged = dict(state_dict)
    for name in state_dict:
        layer = name.removesuffix(".lora_A")
        weight, lora_A, lora_B = f"{layer}.weight", f"{layer}.lora_A", f"{layer}.lora_B"
        if name == lora_A and weight in state_dict and lora_B in state_dict:
            rank = state_dict[lora_A].size(0)
            merged[weight] = merged_weight(state_dict[weight], state_dict[lora_A],
                                           state_dict[lora_B], alpha / rank)
            del merged[lora_A], merged[lora_B]
    return merged
