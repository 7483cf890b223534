"""Export a checkpoint as a Hugging Face model: `python export.py --checkpoint PATH --out DIR`.

The directory it writes loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
runs in `pipeline("text-generation", model=DIR)` with no other step. It holds:
- `config.json` and `model.safetensors`: the model in the target family's names and layout (one
  function per family; today GPT-2, whose architecture ours is, see `gpt2_config`).
- `tokenizer.json` and `tokenizer_config.json`: our tokenizer as the `tokenizers` library's file,
  which `AutoTokenizer` loads and which encodes text to exactly our ids (tokenizer.py builds it).
- `generation_config.json`: what `model.generate` and the pipeline use when not told otherwise
  (see `generation_config`).
- `tokenizer_vocab.json`: the vocabulary, readable without any library:
      {"kind": "char" | "byte" | "bpe",
       "vocab_size": number of real tokens (the model's vocab_size may be padded beyond it),
       "pieces": ["68656c6c6f", ...],   # for each id, the UTF-8 bytes it stands for, in hex
       "tokenizer_state": {...}}        # this project's tokenizer state (tokenizer.py)
  Decoding ids is concatenating their pieces and reading the bytes as UTF-8.
No file a user has is overwritten: `--out` must be new, empty, or an earlier export of ours
(which is replaced), unless `--overwrite true`.

Exporting needs the `safetensors` and `tokenizers` packages; loading the result needs
`transformers`. None is needed to train. Checkpoint loading is checkpoint.py's job.
"""

import json
from pathlib import Path

import torch

from checkpoint import add_checkpoint_arguments, checkpoint_to_load, model_from_checkpoint
from config import ArgumentParser, _parse_bool, fail, run_main
from generation import encode_prompt

# Every file an export writes. A directory holding only these (with our tokenizer_vocab.json)
# is an earlier export, which a new export may replace.
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer_vocab.json")


def parse_export_args(argv=None):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face model directory.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default="hf_model", help="directory to write (default: hf_model)")
    parser.add_argument("--overwrite", type=_parse_bool, default=False, metavar="true|false",
                        help="write into a non-empty --out that is not an earlier export, "
                             "replacing files of the same names (default: false)")
    args = parser.parse_args(argv)
    for flag in ("out", "checkpoint_dir"):
        if not getattr(args, flag).strip():
            fail(f"--{flag} is empty: name a directory (use . for the current one)")
    return args


def gpt2_config(gpt_config, special_ids):
    """config.json for GPT2LMHeadModel: our architecture in GPT-2's field names.

    `activation_function` "gelu_pytorch_tanh" calls the same `gelu(approximate="tanh")` kernel as
    model.py ("gelu_new" is the formula written out in Python, equal only up to rounding). Dropout
    is 0: the export is for inference. `special_ids` are `special_token_ids`'s.
    """
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
        **special_ids,  # GPT-2's default 50256 may not exist here
        "dtype": "float32",
    }


def gpt2_state_dict(model):
    """Our weights under GPT-2's names, as contiguous float32 CPU tensors.

    GPT-2 stores its linear layers as `Conv1D`, whose weight is the transpose of `nn.Linear`'s,
    and always has biases: a model trained with `--bias false` gets zero biases, which compute
    the same thing. The LM head is tied to `transformer.wte`, as in our model.
    """
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


def gpt2_model(model, special_ids):
    """(config.json, weights) of `model` as a Hugging Face GPT-2."""
    return gpt2_config(model.config, special_ids), gpt2_state_dict(model)


def special_token_ids(tokenizer):
    """bos, eos and pad ids for config.json and generation_config.json.

    Our tokenizers have no special tokens, and a model trained without an end-of-text token never
    predicts one, so:
    - bos is the id sample.py starts an empty prompt from (a newline, else id 0): `generate()`
      with no input, or the pipeline with an empty prompt, starts where sample.py does;
    - eos is none: any real id would stop generation wherever the model writes it (a newline,
      say) and so change the text; generation stops at `max_length` instead;
    - pad is none: it would only fill the rows of a batch that end early, which without an eos
      never happens, and a real id as pad would be read as padding wherever it occurs
      (`generate` builds the attention mask from it when given none, hiding every newline, say).
    """
    start = int(encode_prompt(tokenizer, "", "cpu")[0, 0])
    return {"bos_token_id": start, "eos_token_id": None, "pad_token_id": None}


def generation_config(tokenizer, gpt_config, special_ids):
    """generation_config.json: sample.py's defaults, within the model's context.

    Hugging Face does not slide the context window as sample.py does, so prompt plus new tokens
    end at block_size. The ids a BPE vocabulary is padded with are suppressed, as sample.py never
    draws them either; the other choices equal sample.py's defaults (temperature 0.8, no top-k).
    """
    config = {**special_ids, "max_length": gpt_config.block_size,
              "do_sample": True, "temperature": 0.8, "top_k": 0}
    padding = list(range(tokenizer.vocab_size, gpt_config.vocab_size))
    if padding:
        config["suppress_tokens"] = padding
    return config


def tokenizer_config(block_size):
    """tokenizer_config.json: the fast tokenizer over tokenizer.json, with no special tokens to
    add or skip, and decoding that leaves spaces as they are."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
            "clean_up_tokenization_spaces": False}


def tokenizer_vocabulary(tokenizer):
    """The contents of tokenizer_vocab.json (format in the module docstring)."""
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "pieces": [piece.hex() for piece in tokenizer.pieces],
            "tokenizer_state": tokenizer.state_dict()}


def is_earlier_export(directory):
    """Whether `directory` holds nothing but the files of an export of ours."""
    names = {path.name for path in directory.iterdir()}
    if not names <= set(EXPORT_FILES) or "tokenizer_vocab.json" not in names:
        return False
    try:
        vocabulary = json.loads((directory / "tokenizer_vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(vocabulary, dict) and {"kind", "pieces"} <= vocabulary.keys()


def check_out_dir(out, overwrite):
    """Refuse an --out that would replace files not written by an export of ours."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    if overwrite or not out.exists():
        return
    try:
        empty = not any(out.iterdir())
        ours = empty or is_earlier_export(out)
    except OSError as error:
        fail(f"cannot read --out {out}: {error.strerror or error}")
    if not ours:
        fail(f"--out {out} holds files that are not an earlier export: choose another "
             f"directory, or pass --overwrite true to write over its files of the same names")


def _import_save_file():
    try:
        from safetensors.torch import save_file
    except ImportError:
        fail("export.py needs the 'safetensors' package: pip install safetensors "
             "(and transformers to load the export)")
    return save_file


def export(checkpoint_path, out_dir, overwrite=False):
    """Write the Hugging Face directory for `checkpoint_path` into `out_dir`; return its path."""
    save_file = _import_save_file()
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    model, tokenizer, _ = model_from_checkpoint(checkpoint_path)
    special_ids = special_token_ids(tokenizer)
    config, weights = gpt2_model(model, special_ids)
    # tokenizer_vocab.json first: it marks the directory as ours, so an export that fails
    # halfway may be run again into the same directory
    files = {
        "tokenizer_vocab.json": tokenizer_vocabulary(tokenizer),
        "config.json": config,
        "generation_config.json": generation_config(tokenizer, model.config, special_ids),
        "tokenizer.json": tokenizer.hugging_face_json(),
        "tokenizer_config.json": tokenizer_config(model.config.block_size),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (out / name).write_text(text, encoding="utf-8")
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    except OSError as error:
        fail(f"could not write the export to {out}: {error.strerror or error}")
    return out


def main(argv=None):
    args = parse_export_args(argv)
    path = checkpoint_to_load(args)
    out = export(path, args.out, args.overwrite)
    print(f"exported {path} to {out}/")
    print(f"use it with: transformers.pipeline('text-generation', model={str(out)!r})")
    return out


if __name__ == "__main__":
    run_main(main)
