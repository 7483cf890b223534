"""Export a checkpoint as a Hugging Face model: `python export.py --checkpoint PATH --out DIR`.

The directory it writes loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
runs in `pipeline("text-generation", model=DIR)` with no other step. It holds:
- `config.json` and `model.safetensors`: the model in the target family's names and layout, one
  pair of functions per family: GPT-2 for learned positions + LayerNorm + GELU or ReLU²
  (`gpt2_config`), Llama for RoPE + RMSNorm + SwiGLU (`llama_config`), and Qwen3 for the same
  with --qk_norm (`llama_config` too: Qwen3 is Llama with a norm on each head's queries and
  keys), each with a tied or untied head, GPT-2 and Llama with or without biases. Any other
  combination of the model options is refused in one line naming the option (`export_family`).
- `tokenizer.json` and `tokenizer_config.json`: our tokenizer as the `tokenizers` library's file,
  which `AutoTokenizer` loads and which encodes text to exactly our ids (tokenizer.py builds it).
- `generation_config.json`: what `model.generate` and the pipeline use when not told otherwise
  (see `generation_config`); a model trained on documents has its end-of-text token as eos
  (`special_token_ids`), so generation stops where it ends a document.
- `tokenizer_vocab.json`: the vocabulary, readable without any library:
      {"kind": "char" | "byte" | "bpe",
       "vocab_size": number of real tokens (the model's vocab_size may be padded beyond it),
       "pieces": ["68656c6c6f", ...],   # for each id, the UTF-8 bytes it stands for, in hex
       "tokenizer_state": {...}}        # this project's tokenizer state (tokenizer.py)
  Decoding ids is concatenating their pieces and reading the bytes as UTF-8.
- `export_source.json`: where the export came from: {"run": the run directory of the checkpoint
  (resolved), or the Hugging Face directory or model id; "run_id": the run's id, which every
  checkpoint of a training run holds (null for a Hugging Face model); "checkpoint": the file;
  "step": its step}.
No file a user has is overwritten, and no export is lost (`install_export`, and
gpt_train/export_directory.py for whose export --out holds):
- the files are written into a temporary directory beside `--out` and moved into place only once
  all are written, so a failed export (a full disk, a kill) leaves the earlier one working;
- `--out` must be new, empty, or an export of the same run, known by the run's id, not by its
  directory (re-exporting after more training just works; a new run trained into the same
  directory is another run); an export of another run, an export or a checkpoint that does not
  say its run (older versions), or a directory with other files needs `--overwrite true`, which
  replaces the export's files and leaves any others.

Exporting needs the `safetensors` and `tokenizers` packages; loading the result needs
`transformers`. None is needed to train. Checkpoint loading is checkpoint.py's job, the choice of
file rundir/reading.py's.
"""

import json
import os
import re
import shutil
import stat
from pathlib import Path

from gpt_train.cli import exit_on_signals, raise_os_failure, run_main
from config import ArgumentParser, fail, parse_bool
from gpt_train.rundir.names import add_checkpoint_arguments


def parse_export_args(argv=None):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face model directory.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default="hf_model", help="the directory to write: new, empty, "
                        "or an earlier export of the same run")
    parser.add_argument("--overwrite", type=parse_bool, default=False, metavar="true|false",
                        help="write into a non-empty --out that is not an earlier export of "
                             "the same run, replacing files of the same names")
    args = parser.parse_args(argv)
    for flag in ("out", "checkpoint_dir"):
        if not getattr(args, flag).strip():
            fail(f"--{flag} is empty: name a directory (use . for the current one)")
    return args


if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback
    run_main(parse_export_args)  # --help and a mistyped flag answer before torch loads

# The flags above are read before these imports: torch takes seconds to load.
import torch  # noqa: E402

from gpt_train.atomic import fsync_directory, temporary_path  # noqa: E402
from gpt_train.checkpoint import model_from_checkpoint  # noqa: E402
from gpt_train.export_directory import (SOURCE_NAME, check_out_dir,  # noqa: E402
                                        earlier_export_source, export_source, remove_leftovers)
from gpt_train.generation import encode_prompt  # noqa: E402
from model import RMS_NORM_EPS, ROPE_THETA, mlp_hidden_size  # noqa: E402
from gpt_train.rundir.reading import checkpoint_to_load  # noqa: E402
from gpt_train.tokenizer import import_tokenizers  # noqa: E402


# What each Hugging Face family computes, in our options: the family is chosen by --pos and
# --qk_norm, and an option outside the family's set has no export.
EXPORT_FAMILIES = {
    ("learned", False): ("GPT2LMHeadModel", {"norm": ("layernorm",), "mlp": ("gelu", "relu2")}),
    ("rope", False): ("LlamaForCausalLM", {"norm": ("rmsnorm",), "mlp": ("swiglu",)}),
    ("rope", True): ("Qwen3ForCausalLM", {"norm": ("rmsnorm",), "mlp": ("swiglu",),
                                          "bias": (False,)}),  # Qwen3's MLP has no biases
}


def export_family(gpt_config):
    """The Hugging Face class the model's options match, or one line naming the one that does not."""
    options = (gpt_config.pos, gpt_config.qk_norm)
    if options not in EXPORT_FAMILIES:
        fail("--qk_norm true does not export with --pos learned: GPT2LMHeadModel has no norm of "
             "queries and keys (with --pos rope --norm rmsnorm --mlp swiglu it is Qwen3's)")
    family, needs = EXPORT_FAMILIES[options]
    for name, allowed in needs.items():
        value = getattr(gpt_config, name)
        if value not in allowed:
            chosen_by = f"--pos {gpt_config.pos}{' --qk_norm true' if gpt_config.qk_norm else ''}"
            fail(f"--{name} {flag_text(value)} does not export: with {chosen_by} the Hugging Face "
                 f"class is {family}, which needs --{name} {' or '.join(map(flag_text, allowed))}")
    return family


def flag_text(value):
    """A value as it is typed after its flag: booleans as true / false."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def hugging_face_model(model, special_ids):
    """(config.json, weights) of `model` in its family (see `export_family`)."""
    if export_family(model.config) in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        return llama_config(model.config, special_ids), llama_state_dict(model)
    return gpt2_config(model.config, special_ids), gpt2_state_dict(model)


def gpt2_config(gpt_config, special_ids):
    """config.json for GPT2LMHeadModel: our architecture in GPT-2's field names.

    `activation_function` "gelu_pytorch_tanh" calls the same `gelu(approximate="tanh")` kernel as
    model.py ("gelu_new" is the formula written out in Python, equal only up to rounding); "relu2"
    is relu(x) squared, as ours. Dropout is 0: the export is for inference. `special_ids` are
    `special_token_ids`'s.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": gpt_config.vocab_size,  # the model's, padded where the tokenizer's is not
        "n_positions": gpt_config.block_size,
        "n_embd": gpt_config.n_embd,
        "n_layer": gpt_config.n_layer,
        "n_head": gpt_config.n_head,
        "n_inner": mlp_hidden_size(gpt_config),
        "activation_function": {"gelu": "gelu_pytorch_tanh", "relu2": "relu2"}[gpt_config.mlp],
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,  # scaled_dot_product_attention divides by sqrt(head_dim)
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": gpt_config.tie_embeddings,
        **special_ids,  # GPT-2's default 50256 may not exist here
        "dtype": "float32",
    }


def gpt2_state_dict(model):
    """Our weights under GPT-2's names, as contiguous float32 CPU tensors.

    GPT-2 stores its linear layers as `Conv1D`, whose weight is the transpose of `nn.Linear`'s,
    and always has biases: a model trained with `--bias false` gets zero biases, which compute
    the same thing. A tied LM head is `transformer.wte` itself, as in our model.
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
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    return float32_tensors(state)


def llama_config(gpt_config, special_ids):
    """config.json for LlamaForCausalLM (RoPE, RMSNorm and SwiGLU, as our modern options) or,
    with --qk_norm, Qwen3ForCausalLM, which adds an RMSNorm of each head's queries and keys
    before the rotation, as ours.

    Our rotary layout pairs channel i with i + head_dim/2, which is Llama's `rotate_half`, and
    our RMSNorm uses Llama's epsilon, so the weights need no permutation. Every head has its own
    keys and values (num_key_value_heads = heads); `--bias true` is attention_bias + mlp_bias.
    """
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
             "use_sliding_window": False}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "mlp_bias": gpt_config.bias}
    return {
        **(qwen3 if gpt_config.qk_norm else llama),
        "vocab_size": gpt_config.vocab_size,
        "hidden_size": gpt_config.n_embd,
        "intermediate_size": mlp_hidden_size(gpt_config),
        "num_hidden_layers": gpt_config.n_layer,
        "num_attention_heads": gpt_config.n_head,
        "num_key_value_heads": gpt_config.n_head,
        "head_dim": gpt_config.n_embd // gpt_config.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": gpt_config.block_size,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": gpt_config.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": gpt_config.tie_embeddings,
        **special_ids,
        "dtype": "float32",
    }


def llama_state_dict(model):
    """Our weights under Llama's (and Qwen3's) names: the fused qkv and gate+value matrices split
    in three and two (rows, like every nn.Linear here), as contiguous float32 CPU tensors."""
    state = {"model.embed_tokens.weight": model.token_embedding.weight,
             "model.norm.weight": model.ln_f.weight}

    def linear(name, module, rows=slice(None)):
        state[f"{name}.weight"] = module.weight[rows]
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias[rows]

    width, hidden = model.config.n_embd, mlp_hidden_size(model.config)
    for index, block in enumerate(model.blocks):
        prefix = f"model.layers.{index}"
        state[f"{prefix}.input_layernorm.weight"] = block.ln_1.weight
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear(f"{prefix}.self_attn.{name}", block.attn.qkv,
                   slice(part * width, (part + 1) * width))
        linear(f"{prefix}.self_attn.o_proj", block.attn.proj)
        if block.attn.q_norm is not None:
            state[f"{prefix}.self_attn.q_norm.weight"] = block.attn.q_norm.weight
            state[f"{prefix}.self_attn.k_norm.weight"] = block.attn.k_norm.weight
        state[f"{prefix}.post_attention_layernorm.weight"] = block.ln_2.weight
        linear(f"{prefix}.mlp.gate_proj", block.mlp.fc, slice(0, hidden))
        linear(f"{prefix}.mlp.up_proj", block.mlp.fc, slice(hidden, 2 * hidden))
        linear(f"{prefix}.mlp.down_proj", block.mlp.proj)
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    return float32_tensors(state)


def float32_tensors(state):
    return {name: tensor.detach().to("cpu", torch.float32).contiguous()
            for name, tensor in state.items()}


def special_token_ids(tokenizer):
    """bos, eos and pad ids for config.json and generation_config.json.

    A model trained on documents has an end-of-text id (tokenizer.py): it is the eos, where
    `generate()` and the pipeline stop as sample.py does, and the bos, the id sample.py starts
    an empty prompt from (GPT-2's own choice for both). Otherwise our tokenizers have no special
    tokens, and a model trained without one never predicts one, so:
    - bos is the id sample.py starts an empty prompt from (a newline, else id 0): `generate()`
      with no input, or the pipeline with an empty prompt, starts where sample.py does;
    - eos is none: any real id would stop generation wherever the model writes it (a newline,
      say) and so change the text; generation stops at `max_length` instead;
    - pad is none: it would only fill the rows of a batch that end early, which without an eos
      never happens, and a real id as pad would be read as padding wherever it occurs
      (`generate` builds the attention mask from it when given none, hiding every newline, say).
    """
    start = int(encode_prompt(tokenizer, "", "cpu")[0, 0])
    return {"bos_token_id": start, "eos_token_id": getattr(tokenizer, "end_of_text", None),
            "pad_token_id": None}


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


def tokenizer_config(tokenizer_json, block_size, special_ids):
    """tokenizer_config.json: the fast tokenizer over tokenizer.json, adding no tokens, decoding
    spaces as they are, with `special_ids`'s bos (the id sample.py starts from: lm-eval puts it
    before an empty context) and eos where there is one (a model of documents: both its
    end-of-text token, as GPT-2's). A bos is special: `skip_special_tokens` drops it."""
    backend = import_tokenizers("exporting the tokenizer").Tokenizer.from_str(tokenizer_json)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False,
              "bos_token": backend.id_to_token(special_ids["bos_token_id"])}
    if special_ids["eos_token_id"] is not None:
        config["eos_token"] = backend.id_to_token(special_ids["eos_token_id"])
    return config


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


def write_files(directory, files, weights, save_file):
    """Every file of the export into the new `directory`, each flushed to the disk."""
    directory.mkdir()
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
        with open(directory / name, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    weights_path = directory / "model.safetensors"
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    # safetensors makes its file readable by its owner alone; it takes the mode the user's umask
    # gave the files written above, so teammates read the weights as they read the rest
    os.chmod(weights_path, stat.S_IMODE((directory / "config.json").stat().st_mode))
    with open(weights_path, "rb") as handle:
        os.fsync(handle.fileno())
    fsync_directory(directory)


def temporary_directory(target):
    """Where the export is written first: beside --out, to be renamed into place (a new --out, or
    an earlier export swapped whole); inside --out where the files move one by one into a
    directory that stays (an empty one, or a user's with --overwrite)."""
    renamed = not target.exists() or earlier_export_source(target) is not None
    return temporary_path((target.parent if renamed else target) / target.name)


def install_export(temporary, target):
    """Move the finished export in `temporary` (`temporary_directory`'s) to `target`.

    A new --out is the temporary directory renamed. An earlier export (only our files) is swapped
    out whole: renamed aside, the new one renamed in, the old one deleted, so at no moment is a
    half-written export in place. Into an empty or a user's directory (--overwrite) each file
    is moved over its namesake, and the user's other files stay."""
    if temporary.parent == target:
        for path in temporary.iterdir():
            os.replace(path, target / path.name)
        temporary.rmdir()
    elif not target.exists():
        os.rename(temporary, target)
    else:
        retired = temporary.with_name(temporary.name + ".old")
        os.rename(target, retired)
        try:
            os.rename(temporary, target)
        except OSError:
            os.rename(retired, target)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    fsync_directory(target.parent)


def write_failure(error):
    """Why writing failed, in a few words, or None for an error that is not about writing.
    safetensors reports a failed write (a full disk) as a SafetensorError, not an OSError."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if type(error).__name__ == "SafetensorError":
        reason = re.search(r'message: "([^"]+)"', str(error))
        return reason.group(1) if reason else (str(error).splitlines() or ["write failed"])[0]
    return None


def export(checkpoint_path, out_dir, overwrite=False):
    """Write the Hugging Face directory for `checkpoint_path` into `out_dir`; return its path."""
    save_file = _import_save_file()
    out = Path(out_dir)
    source = export_source(checkpoint_path)
    target = out.resolve()  # a link to a directory: the export goes where it points
    if not out.exists() or out.is_dir():
        remove_leftovers(target)
    check_out_dir(out, overwrite, source)
    model, tokenizer, _ = model_from_checkpoint(checkpoint_path)
    special_ids = special_token_ids(tokenizer)
    tokenizer_json = tokenizer.hugging_face_json()
    config, weights = hugging_face_model(model, special_ids)
    files = {
        "tokenizer_vocab.json": tokenizer_vocabulary(tokenizer),
        "config.json": config,
        "generation_config.json": generation_config(tokenizer, model.config, special_ids),
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config(tokenizer_json, model.config.block_size,
                                                  special_ids),
        SOURCE_NAME: source,
    }
    existed = out.exists()
    temporary = temporary_directory(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_files(temporary, files, weights, save_file)
        install_export(temporary, target)
    except Exception as error:  # only a failure to write is reported here; the rest propagates
        shutil.rmtree(temporary, ignore_errors=True)
        reason = write_failure(error)
        if reason is None:
            raise
        kept = f"{out} is as it was" if existed else "nothing was written"
        raise_os_failure(f"could not write the export to {out}: {reason}; {kept}", error)
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
