"""The LM head and its cross-entropy fused, so the (tokens x vocabulary) logits never exist whole.

The plain loss (`F.cross_entropy` of `lm_head(hidden)`) keeps the full logits, their float32 copy
and its gradient alive: 3.3 GB each in float32 for GPT-2 124M at batch 16 x 1024. Here the rows
go through in chunks: a chunk's logits are computed in the matmul dtype (autocast's, if on), its
log-softmax in float32, and the gradients of the mean loss with respect to the hidden states and
the head's weight are computed right away, in the forward pass, and kept for backward. Only one
chunk of logits exists at a time; the gradients cost what the hidden states and the weight do.

The result matches the plain loss within float rounding (the chunks are summed in a different
order). It is plain tensor code inside one `autograd.Function`, so `torch.compile` traces it like
any other. Which path a forward takes is model.py's choice.
"""

import math

import torch

CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 256 MB in bfloat16, 512 MB as float32


def linear_cross_entropy(hidden, weight, labels, dtype, ignore_index=-100):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, in chunks of rows.

    hidden: (tokens, width); weight: (vocabulary, width), a tied one included; labels: (tokens,),
    `ignore_index` where a position is not scored. The logits are computed in `dtype`.
    """
    grad_enabled = torch.is_grad_enabled()
    rows = chunk_rows(hidden.size(0), weight.size(0))
    return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, dtype, rows,
                                    grad_enabled and hidden.requires_grad,
                                    grad_enabled and weight.requires_grad)


def chunk_rows(tokens, vocab_size):
    """Rows per chunk: a power-of-two number of equal chunks, each within CHUNK_ELEMENTS logits."""
    chunks = 1 << max(0, math.ceil(math.log2(max(1, tokens * vocab_size) / CHUNK_ELEMENTS)))
    return max(1, math.ceil(tokens / chunks))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, dtype, rows, hidden_grad, weight_grad):
        matrix = weight.to(dtype)
        scored = labels != ignore_index
        count = scored.sum()
        # a scored position's gradient weighs 1/count, as in the mean; nothing scored gives 0/0,
        # as in F.cross_entropy
        row_weights = scored.float() / count
        targets = torch.where(scored, labels, 0)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        needs_grad = hidden_grad or weight_grad
        # a frozen input (a LoRA run's embedding) gets a zero-sized stand-in, never computed
        grad_hidden = torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else \
            weight.new_empty(0)
        for start in range(0, hidden.size(0), rows):
            end = start + rows
            chunk = hidden[start:end].to(dtype)
            logits = (chunk @ matrix.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            target_logits = logits.gather(1, targets[start:end, None])
            total = total + ((log_norm - target_logits).squeeze(1) * scored[start:end]).sum()
            if needs_grad:
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count on scored rows
                grad_logits = torch.exp(logits - log_norm)
                grad_logits = grad_logits.scatter_add(1, targets[start:end, None],
                                                      torch.full_like(target_logits, -1.0))
                grad_logits = (grad_logits * row_weights[start:end, None]).to(dtype)
                if hidden_grad:
                    grad_hidden[start:end] = grad_logits @ matrix
                if weight_grad:
                    grad_weight = grad_weight + (grad_logits.t() @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_grad, weight_grad = ctx.needs_input_grad[:2]
        return (grad_hidden * grad_loss if hidden_grad else None,
                (grad_weight * grad_loss).to(ctx.weight_dtype) if weight_grad else None,
                None, None, None, None, None, None)
