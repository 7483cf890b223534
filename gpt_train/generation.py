"""Text in, text out: a prompt's ids, and a continuation decoded as it is generated.

Shared by sample.py and by train.py's samples during training. Notable details:
- an empty prompt starts from a newline, the way the corpus's own lines start (or from id 0 when
  the vocabulary has no newline); a model of documents starts one, after the end-of-text id;
- generation stops where the model ends a document (writes the end-of-text id), unless told to
  go on, when the boundary is shown as `<|endoftext|>`;
- text is written to a stream piece by piece, a multi-byte character once it is complete;
- `vocab_limit` keeps ids beyond the tokenizer's (the padding of a BPE vocabulary) from being drawn.
Drawing the ids (the key/value cache, top-k, top-p) is model.py's job.
"""

import contextlib

import torch

from config import UserError
from gpt_train.tokenizer import END_OF_TEXT, StreamDecoder


def encode_prompt(tokenizer, prompt, device):
    """The prompt's ids; an empty prompt starts a document (the end-of-text id) where the
    vocabulary has one, else from a newline (or id 0 if the vocabulary has none)."""
    end_of_text = getattr(tokenizer, "end_of_text", None)
    try:
        ids = [end_of_text] if not prompt and end_of_text is not None else \
            tokenizer.encode(prompt or "\n")
    except UserError:
        if prompt:
            raise
        ids = [0]
    return torch.tensor(ids, dtype=torch.long, device=device)[None, :]


def generate_text(model, tokenizer, prompt, max_new_tokens, stream=None,
                  autocast=contextlib.nullcontext, stop_at_end_of_text=True, **sampling):
    """Generate a continuation of `prompt`; write it to `stream` piece by piece; return it.

    It ends at the end-of-text id (not written) unless `stop_at_end_of_text` is false. `sampling`
    holds `GPT.generate_stream`'s options: temperature, top_k, top_p, generator.
    """
    device = next(model.parameters()).device
    decoder = StreamDecoder(tokenizer)
    end_of_text = getattr(tokenizer, "end_of_text", None)
    pieces = []
    with autocast():
        tokens = model.generate_stream(encode_prompt(tokenizer, prompt, device), max_new_tokens,
                                       vocab_limit=tokenizer.vocab_size, **sampling)
        for token in tokens:
            token_id = int(token[0])  # the one read of each drawn id from the device
            if token_id == end_of_text:
                if stop_at_end_of_text:
                    break
                pieces.append(decoder.flush() + END_OF_TEXT)
            else:
                pieces.append(decoder.push(token_id))
            if stream is not None and pieces[-1]:
                stream.write(pieces[-1])
                stream.flush()
    pieces.append(decoder.flush())
    if stream is not None:
        stream.write(pieces[-1])
    return "".join(pieces)
