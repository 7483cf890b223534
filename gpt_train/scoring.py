"""Scoring a model on text: summed loss, token and byte counts, and the figures made of them.

One scorer serves training's validation estimate (train.py) and evaluate.py, so the two cannot
drift apart. Positions labelled `IGNORE_INDEX` are not scored; the bytes of a scored token are the
UTF-8 bytes its id stands for, so bits per byte (total nats / ln 2 / bytes) compares runs whose
tokenizers differ. Which windows of a text are scored is left to the callers.
"""

import contextlib
import math

import torch

from model import IGNORE_INDEX


def piece_lengths(tokenizer, device="cpu"):
    """The UTF-8 length of each id's piece, as a float64 tensor indexed by id."""
    return torch.tensor([len(piece) for piece in tokenizer.pieces], dtype=torch.float64,
                        device=device)


@torch.no_grad()
def score_batches(model, batches, piece_bytes, autocast=contextlib.nullcontext):
    """Total nats, scored tokens and their bytes over (input_ids, labels) batches.

    Returns one float64 tensor of three sums on the model's device: everything is summed there,
    so scoring makes no host-device synchronisation per batch. The model stays in its mode; call
    it in eval mode for a deterministic score.
    """
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        scored = y != IGNORE_INDEX
        count = scored.sum()
        with autocast():
            # the training loss, the same code; chunked, the whole logits are never held
            mean_loss = model(input_ids=x, labels=y, return_logits=False).loss
        # a batch with nothing scored has a mean of 0/0: it adds nothing
        totals[0] += torch.where(count > 0, mean_loss.double() * count, 0.0)
        totals[1] += count
        totals[2] += (piece_bytes[y.clamp_min(0)] * scored).sum()
    return totals


def summarize(total_nats, num_tokens, num_bytes):
    """Mean loss, perplexity and bits per byte from the totals."""
    loss = total_nats / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": total_nats / math.log(2) / num_bytes,
            "tokens": int(num_tokens), "bytes": int(num_bytes)}
