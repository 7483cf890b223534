"""Export a checkpoint as a Hugging Face GPT-2: `python export.py --checkpoint PATH --out DIR`.

The directory it writes loads with `transformers.GPT2LMHeadModel.from_pretrained(DIR)` and no
other step. Our model is GPT-2's architecture, so the export only renames and reshapes:
- `config.json`: GPT-2 settings; `activation_function` is "gelu_pytorch_tanh", which calls the
  same `gelu(approximate="tanh")` kernel as model.py ("gelu_new" is the same formula written out
  in Python, equal only up to rounding). Dropout is 0: the export is for inference.
- `model.safetensors`: the weights under GPT-2's names (`transformer.wte`, `transformer.h.N.attn.
  c_attn`, ...). GPT-2 stores its linear layers as `Conv1D`, whose weight is the transpose of
  `nn.Linear`'s, and it always has biases: a model trained with `--bias false` gets zero biases,
  which compute the same thing. The LM head is tied to `transformer.wte`, as in our model.
- `tokenizer_vocab.json`: the vocabulary, readable without this project:
      {"kind": "char" | "byte" | "bpe",
       "vocab_size": number of real tokens (the model's vocab_size may be padded beyond it),
       "pieces": ["68656c6c6f", ...],   # for each id, the UTF-8 bytes it stands for, in hex
       "tokenizer_state": {...}}        # this project's tokenizer state (tokenizer.py)
  Decoding ids is concatenating their pieces and reading the bytes as UTF-8. A char vocabulary
  encodes a character as the id of its piece; a byte vocabulary is ids 0-255 = byte values.
- for a BPE tokenizer, also `tokenizer.json` (the `tokenizers` library's file) and
  `tokenizer_config.json`, so `transformers.AutoTokenizer.from_pretrained(DIR)` loads it too.

Exporting needs the `safetensors` package; loading the result needs `transformers`. Neither is
needed to train. Checkpoint loading is checkpoint.py's job.
"""

import json
from pathlib import Path

import torch

from checkpoint import add_checkpoint_arguments, checkpoint_to_load, model_from_checkpoint
from config import ArgumentParser, fail, run_main


def parse_export_args(argv=None):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face GPT-2 directory.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default="hf_model", help="directory to write (default: hf_model)")
    return parser.parse_args(argv)


def gpt2_config(gpt_config):
    """config.json for GPT2LMHeadModel: our architecture in GPT-2's field names."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": gpt_config.vocab_size,  # the model's, padded where the tokenizer's is not
        "n_positions": gpt_config.block_size,
        "n_embd": gpt_config.n_embd,
        "n_layer": gpt_config.n_layer,
        "n_head": gpt_config.n_head,
        "n_inner": 4 * gpt_config.n_embd,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,  # scaled_dot_product_attention divides by sqrt(head_dim)
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        # our tokenizers have no special tokens; GPT-2's default id 50256 may not exist here
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": "float32",
    }


def gpt2_state_dict(model):
    """Our weights under GPT-2's names, as contiguous float32 CPU tensors."""
    state = {"transformer.wte.weight": model.token_embedding.weight,
             "transformer.wpe.weight": model.position_embedding.weight}

    def layer_norm(name, module):
        state[f"{name}.weight"] = module.weight
        state[f"{name}.bias"] = module.bias if module.bias is not None else \
            torch.zeros_like(module.weight)

    def conv1d(name, linear):
        state[f"{name}.weight"] = linear.weight.t()  # Conv1D computes x @ W, nn.Linear x @ W.T
        state[f"{name}.bias"] = linear.bias if linear.bias is not None else \
            torch.zeros(linear.out_features)

    for index, block in enumerate(model.blocks):
        prefix = f"transformer.h.{index}"
        layer_norm(f"{prefix}.ln_1", block.ln_1)
        conv1d(f"{prefix}.attn.c_attn", block.attn.qkv)
        conv1d(f"{prefix}.attn.c_proj", block.attn.proj)
        layer_norm(f"{prefix}.ln_2", block.ln_2)
        conv1d(f"{prefix}.mlp.c_fc", block.mlp.fc)
        conv1d(f"{prefix}.mlp.c_proj", block.mlp.proj)
    layer_norm("transformer.ln_f", model.ln_f)
    return {name: tensor.detach().to("cpu", torch.float32).contiguous()
            for name, tensor in state.items()}


def tokenizer_vocabulary(tokenizer):
    """The contents of tokenizer_vocab.json (format in the module docstring)."""
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "pieces": [piece.hex() for piece in tokenizer.pieces],
            "tokenizer_state": tokenizer.state_dict()}


def _import_save_file():
    try:
        from safetensors.torch import save_file
    except ImportError:
        fail("export.py needs the 'safetensors' package: pip install safetensors "
             "(and transformers to load the export)")
    return save_file


def export(checkpoint_path, out_dir):
    """Write the Hugging Face directory for `checkpoint_path` into `out_dir`; return its path."""
    save_file = _import_save_file()
    model, tokenizer, _ = model_from_checkpoint(checkpoint_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(gpt2_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
        write_json(out / "config.json", gpt2_config(model.config))
        write_json(out / "tokenizer_vocab.json", tokenizer_vocabulary(tokenizer))
        if tokenizer.kind == "bpe":
            (out / "tokenizer.json").write_text(tokenizer.tokenizer_json)
            write_json(out / "tokenizer_config.json",
                       {"tokenizer_class": "PreTrainedTokenizerFast",
                        "model_max_length": model.config.block_size})
    except OSError as error:
        fail(f"could not write the export to {out}: {error.strerror or error}")
    return out


def write_json(path, value):
    path.write_text(json.dumps(value, indent=2) + "\n")


def main(argv=None):
    args = parse_export_args(argv)
    path = checkpoint_to_load(args)
    out = export(path, args.out)
    print(f"exported {path} to {out}/")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return out


if __name__ == "__main__":
    run_main(main)
