"""Text in, text out: a prompt's ids, and a continuation decoded as it is generated.

Shared by sample.py and by train.py's samples during training. Notable details:
- an empty prompt starts from a newline, the way the corpus's own lines start (or from id 0 when
  the vocabulary has no newline);
- text is written to a stream piece by piece, a multi-byte character once it is complete;
- `vocab_limit` keeps ids beyond the tokenizer's (the padding of a BPE vocabulary) from being drawn.
Drawing the ids (the key/value cache, top-k, top-p) is model.py's job.
"""

import contextlib

import torch

from cli import UserError
from tokenizer import StreamDecoder


def encode_prompt(tokenizer, prompt, device):
    """The prompt's ids; an empty prompt starts from a newline (or id 0 if the vocabulary has none)."""
    try:
        ids = tokenizer.encode(prompt or "\n")
    except UserError:
        if prompt:
            raise
        ids = [0]
    return torch.tensor(ids, dtype=torch.long, device=device)[None, :]


def generate_text(model, tokenizer, prompt, max_new_tokens, stream=None,
                  autocast=contextlib.nullcontext, **sampling):
    """Generate a continuation of `prompt`; write it to `stream` piece by piece; return it.

    `sampling` holds `GPT.generate_stream`'s options: temperature, top_k, top_p, generator.
    """
    device = next(model.parameters()).device
    decoder = StreamDecoder(tokenizer)
    pieces = []
    with autocast():
        tokens = model.generate_stream(encode_prompt(tokenizer, prompt, device), max_new_tokens,
                                       vocab_limit=tokenizer.vocab_size, **sampling)
        for token in tokens:
            pieces.append(decoder.push(token[0]))
            if stream is not None and pieces[-1]:
                stream.write(pieces[-1])
                stream.flush()
    pieces.append(decoder.flush())
    if stream is not None:
        stream.write(pieces[-1])
    return "".join(pieces)
