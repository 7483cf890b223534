"""A Hugging Face GPT-2 becomes this project's checkpoint: `checkpoint_from_pretrained(source)`.

`source` is a GPT-2 model id (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`) or a
directory written by `save_pretrained` or by export.py. The result is the plain dict a training
run saves (weights, `gpt_config`, tokenizer), so checkpoint.py hands it to train.py's --init_from,
sample.py, evaluate.py and export.py as if it had been read from a file. Notable details:
- GPT-2 stores its linear layers as `Conv1D`, whose weight is the transpose of `nn.Linear`'s;
  its `gelu_new` is the tanh GELU of model.py written out, and its LayerNorm eps is ours (1e-5);
  export.py's GPT-2 variants (ReLU², an untied head) come back as they went out;
- a BPE vocabulary is padded to a multiple of 64, as a trained one is: padded ids are never
  sampled nor predicted (model.py's `vocab_limit`);
- the tokenizer is read from `tokenizer.json` (or `vocab.json` + `merges.txt`) with `tokenizers`
  and stored like a trained BPE tokenizer; export.py's directories bring back their own tokenizer;
- a model id is fetched with `huggingface_hub` into the cache `transformers` shares; a local
  directory needs only `safetensors` (or torch, for `pytorch_model.bin`) and `tokenizers`.
Only the GPT-2 architecture maps onto model.py: any other setting is one clear error.
"""

import json
import math
from pathlib import Path

import torch

from cli import fail
from config import GPTConfig, config_to_dict
from tokenizer import BPETokenizer, import_tokenizers, tokenizer_from_state

MODEL_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
             "openai-community/gpt2", "openai-community/gpt2-medium",
             "openai-community/gpt2-large", "openai-community/gpt2-xl", "distilbert/distilgpt2")
HUB_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "vocab.json", "merges.txt"]
# GPT2Config's defaults, for a config.json that leaves a field out
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                 "n_head": 12}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one function, three spellings
# inside block i: GPT-2's module names -> ours
LAYER_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}
CONV1DS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc",
           "mlp.c_proj": "mlp.proj"}


def is_pretrained(source):
    """True for a directory or a GPT-2 model id: what `checkpoint_from_pretrained` reads."""
    path = Path(source)
    return path.is_dir() or (not path.exists() and str(source) in MODEL_IDS)


def checkpoint_from_pretrained(source):
    """{"model_state_dict", "gpt_config", "tokenizer", ...} of a Hugging Face GPT-2, on the CPU."""
    directory = Path(source) if Path(source).is_dir() else download(str(source))
    settings = read_config(directory)
    tokenizer = read_tokenizer(directory)
    if tokenizer.vocab_size > settings["vocab_size"]:
        fail(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
             f"{settings['vocab_size']}")
    gpt_config = gpt_config_from(settings, source)
    if tokenizer.kind == "bpe":  # as a trained one is (export.py's char and byte ones are not)
        gpt_config.vocab_size = (settings["vocab_size"] + 63) // 64 * 64
    state = model_state_from(read_weights(directory), gpt_config, source)
    return {"model_state_dict": state, "gpt_config": config_to_dict(gpt_config),
            "tokenizer": tokenizer.state_dict(), "step": 0, "pretrained": str(source)}


def download(model_id):
    """The local directory of `model_id`'s files, from the Hugging Face cache or the Hub."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        fail(f"loading {model_id} from the Hugging Face Hub needs 'huggingface_hub', which comes "
             f"with transformers: pip install transformers")
    try:
        directory = Path(snapshot_download(model_id, allow_patterns=HUB_FILES))
        if not any(directory.glob("model*.safetensors")):
            directory = Path(snapshot_download(model_id, allow_patterns=["pytorch_model*.bin"]))
    except LocalEntryNotFoundError:
        fail(f"cannot download {model_id}: no network, and it is not in the Hugging Face cache; "
             f"pass a local directory written by save_pretrained instead")
    except Exception as error:  # the hub raises many types (HTTP, disk, ...); all end the same way
        fail(f"cannot download {model_id}: {type(error).__name__}: {first_line(error)}; "
             f"pass a local directory written by save_pretrained instead")
    return directory


def first_line(error):
    return (str(error).strip().splitlines() or [""])[0]


def read_config(directory):
    path = directory / "config.json"
    if not path.is_file():
        fail(f"{directory} is not a Hugging Face model directory: it has no config.json (of a "
             f"training run's directory, name one of its .pt files)")
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        fail(f"{path} is unreadable: {first_line(error)}")
    if not isinstance(settings, dict):
        fail(f"{path} is not a model configuration")
    return {**GPT2_DEFAULTS, **settings}


def gpt_config_from(settings, source):
    """Our GPTConfig for a GPT-2 config.json; a setting our GPT cannot reproduce is an error."""
    if settings.get("model_type") != "gpt2":
        fail(f"{source} holds a {settings.get('model_type')!r} model; only GPT-2 models "
             f"(model_type 'gpt2') map onto this project's GPT")
    n_embd, activation = settings["n_embd"], settings.get("activation_function", "gelu_new")
    fits = {
        "activation_function": activation in TANH_GELUS or activation == "relu2",
        "layer_norm_epsilon": math.isclose(settings.get("layer_norm_epsilon", 1e-5), 1e-5),
        "n_inner": settings.get("n_inner") in (None, 4 * n_embd),
        "scale_attn_weights": settings.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": not settings.get("scale_attn_by_inverse_layer_idx"),
        "add_cross_attention": not settings.get("add_cross_attention"),
    }
    for name, fit in fits.items():
        if not fit:
            fail(f"{source}: {name}={settings.get(name)!r} has no equivalent in this project's "
                 f"GPT (GPT-2's tanh GELU or ReLU², LayerNorm eps 1e-5, MLP width 4 x n_embd)")
    # the other settings are model.py's defaults: GPT-2's learned positions and LayerNorm
    return GPTConfig(vocab_size=settings["vocab_size"], block_size=settings["n_positions"],
                     n_layer=settings["n_layer"], n_head=settings["n_head"], n_embd=n_embd,
                     dropout=0.0, bias=True, mlp="relu2" if activation == "relu2" else "gelu",
                     tie_embeddings=settings.get("tie_word_embeddings", True) is not False)


def read_weights(directory):
    """GPT-2's tensors by name, without the `transformer.` prefix newer files add."""
    safetensors_files = sorted(directory.glob("model*.safetensors"))  # shards of a large model
    bin_files = sorted(directory.glob("pytorch_model*.bin"))
    if not safetensors_files and not bin_files:
        fail(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin")
    weights = {}
    for path in safetensors_files or bin_files:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                weights.update(load_file(str(path)))
            else:
                weights.update(torch.load(path, map_location="cpu", weights_only=True))
        except ImportError:
            fail("reading model.safetensors needs the 'safetensors' package: "
                 "pip install safetensors")
        except Exception as error:  # a damaged file raises many types; all mean the same
            fail(f"{path} is unreadable (corrupt, truncated or unsafe): {type(error).__name__}")
    return {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}


def model_state_from(weights, gpt_config, source):
    """model.py's state dict from GPT-2's tensors: renamed, Conv1D weights transposed, padded."""
    def take(name):
        if name not in weights:
            fail(f"{source}: the weights lack {name!r}, which a GPT-2 has")
        return weights[name].to(torch.float32)

    def padded(matrix):
        # Padded rows start as the mean real row: the logit they get is an average one, so even a
        # model exported back to Hugging Face (which does not know they are padding) never
        # favours them.
        rows = matrix.new_empty(gpt_config.vocab_size - matrix.size(0), matrix.size(1))
        return torch.cat([matrix, rows.copy_(matrix.mean(0))])

    embedding = padded(take("wte.weight"))
    head = embedding if gpt_config.tie_embeddings else padded(take("lm_head.weight"))
    state = {"token_embedding.weight": embedding, "lm_head.weight": head,
             "position_embedding.weight": take("wpe.weight"),
             "ln_f.weight": take("ln_f.weight"), "ln_f.bias": take("ln_f.bias")}
    for index in range(gpt_config.n_layer):
        theirs, ours = f"h.{index}", f"blocks.{index}"
        for their_name, our_name in LAYER_NORMS.items():
            for part in ("weight", "bias"):
                state[f"{ours}.{our_name}.{part}"] = take(f"{theirs}.{their_name}.{part}")
        for their_name, our_name in CONV1DS.items():
            weight = take(f"{theirs}.{their_name}.weight")
            state[f"{ours}.{our_name}.weight"] = weight.t().contiguous()  # Conv1D: x @ W
            state[f"{ours}.{our_name}.bias"] = take(f"{theirs}.{their_name}.bias")
    return state


def read_tokenizer(directory):
    """The directory's tokenizer: export.py's own, else `tokenizer.json`, else vocab + merges."""
    exported = directory / "tokenizer_vocab.json"
    if exported.is_file():  # written by export.py: this project's tokenizer, exactly as trained
        try:
            return tokenizer_from_state(json.loads(exported.read_text()).get("tokenizer_state"))
        except (OSError, ValueError, AttributeError) as error:
            fail(f"{exported} is unreadable: {first_line(error)}")
    if (directory / "tokenizer.json").is_file():
        return BPETokenizer((directory / "tokenizer.json").read_text())
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return BPETokenizer(bpe_json_from_vocab_and_merges(vocab, merges))
    fail(f"no tokenizer in {directory}: expected tokenizer.json, or vocab.json and merges.txt")


def bpe_json_from_vocab_and_merges(vocab, merges):
    """GPT-2's older tokenizer files as the `tokenizers` JSON a BPETokenizer is stored as."""
    tokenizers = import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers

    try:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as error:  # the library raises a bare Exception for a malformed file
        fail(f"{vocab} and {merges} are not a BPE vocabulary: {first_line(error)}")
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend.to_str()
