"""A Hugging Face model becomes this project's checkpoint: `checkpoint_from_pretrained(source)`.

`source` is a GPT-2 model id (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`) or a
directory written by `save_pretrained` or by export.py: a GPT-2, or a Llama or Qwen3 of the shapes
export.py writes (every head its own keys and values, our RoPE base and RMSNorm epsilon). The
result is the plain dict a training run saves (weights, `gpt_config`, tokenizer), so
checkpoint.py hands it to train.py's --init_from, sample.py, evaluate.py and export.py as if it
had been read from a file. Notable details:
- GPT-2 stores its linear layers as `Conv1D`, whose weight is the transpose of `nn.Linear`'s;
  its `gelu_new` is the tanh GELU of model.py written out, and its LayerNorm eps is ours (1e-5);
  export.py's GPT-2 variants (ReLU², an untied head) come back as they went out;
- Llama and Qwen3 keep queries, keys and values (and SwiGLU's gate and value) as separate
  matrices, which are concatenated back into model.py's fused ones (`llama_state_from`);
- a BPE vocabulary is padded to a multiple of 64, as a trained one is: padded ids are never
  sampled nor predicted (model.py's `vocab_limit`);
- the tokenizer is read from `tokenizer.json` (or `vocab.json` + `merges.txt`) with `tokenizers`
  and stored like a trained BPE tokenizer; export.py's directories bring back their own tokenizer;
- a model id is fetched with `huggingface_hub` into the cache `transformers` shares; a local
  directory needs only `safetensors` (or torch, for `pytorch_model.bin`) and `tokenizers`.
Any other architecture or setting is one clear error naming it.
`tokenizer_from_pretrained` reads only the tokenizer (--tokenizer gpt2, or a tokenizer.json), with
its end-of-text token (tokenizer_config.json's eos_token, or the special token named for it).
"""

import json
import math
from pathlib import Path

import torch

from config import GPTConfig, UserError, config_to_dict, fail
from model import RMS_NORM_EPS, ROPE_THETA, mlp_hidden_size
from gpt_train.tokenizer import BPETokenizer, import_tokenizers, tokenizer_from_state

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
    """{"model_state_dict", "gpt_config", "tokenizer", ...} of a Hugging Face model, on the CPU."""
    directory = Path(source) if Path(source).is_dir() else download(str(source))
    settings = read_config(directory)
    tokenizer = read_tokenizer(directory)
    if tokenizer.vocab_size > settings["vocab_size"]:
        fail(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
             f"{settings['vocab_size']}")
    family = settings.get("model_type")
    if family not in ("gpt2", "llama", "qwen3"):
        fail(f"{source} holds a {family!r} model; only GPT-2 models (model_type 'gpt2') and "
             f"Llama or Qwen3 models as export.py writes them map onto this project's GPT")
    read = {"gpt2": (gpt_config_from, model_state_from),
            "llama": (llama_config_from, llama_state_from),
            "qwen3": (llama_config_from, llama_state_from)}
    config_reader, state_reader = read[family]
    gpt_config = config_reader(settings, source)
    if tokenizer.kind == "bpe":  # as a trained one is (export.py's char and byte ones are not)
        gpt_config.vocab_size = (settings["vocab_size"] + 63) // 64 * 64
    state = state_reader(weight_reader(read_weights(directory), source), gpt_config)
    return {"model_state_dict": state, "gpt_config": config_to_dict(gpt_config),
            "tokenizer": tokenizer.state_dict(), "step": 0, "pretrained": str(source)}


def download(model_id, patterns=HUB_FILES):
    """The local directory of `model_id`'s files, from the Hugging Face cache or the Hub."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        fail(f"loading {model_id} from the Hugging Face Hub needs 'huggingface_hub', which comes "
             f"with transformers: pip install transformers")
    try:
        directory = Path(snapshot_download(model_id, allow_patterns=patterns))
        if patterns == HUB_FILES and not any(directory.glob("model*.safetensors")):
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
    return {**GPT2_DEFAULTS, **settings} if settings.get("model_type") == "gpt2" else settings


def gpt_config_from(settings, source):
    """Our GPTConfig for a GPT-2 config.json; a setting our GPT cannot reproduce is an error."""
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


def weight_reader(weights, source):
    """`take(name)`: the tensor `name` in float32, or one line saying the model lacks it."""
    def take(name):
        if name not in weights:
            fail(f"{source}: the weights lack {name!r}, which its architecture has")
        return weights[name].to(torch.float32)
    return take


def padded(matrix, vocab_size):
    """`matrix`'s rows, then rows up to `vocab_size` that start as the mean real row: the logit
    they get is an average one, so even a model exported back to Hugging Face (which does not
    know they are padding) never favours them."""
    rows = matrix.new_empty(vocab_size - matrix.size(0), matrix.size(1))
    return torch.cat([matrix, rows.copy_(matrix.mean(0))])


def model_state_from(take, gpt_config):
    """model.py's state dict from GPT-2's tensors: renamed, Conv1D weights transposed, padded."""
    embedding = padded(take("wte.weight"), gpt_config.vocab_size)
    head = embedding if gpt_config.tie_embeddings else \
        padded(take("lm_head.weight"), gpt_config.vocab_size)
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


def llama_config_from(settings, source):
    """Our GPTConfig (--pos rope --norm rmsnorm --mlp swiglu, and --qk_norm for Qwen3) for a
    Llama or Qwen3 config.json; a setting our GPT cannot reproduce is one line naming it."""
    qwen3 = settings.get("model_type") == "qwen3"
    try:
        width, heads = int(settings["hidden_size"]), int(settings["num_attention_heads"])
        gpt_config = GPTConfig(
            vocab_size=int(settings["vocab_size"]),
            block_size=int(settings["max_position_embeddings"]),
            n_layer=int(settings["num_hidden_layers"]), n_head=heads, n_embd=width, dropout=0.0,
            bias=settings.get("attention_bias", False) is True, pos="rope", norm="rmsnorm",
            qk_norm=qwen3, mlp="swiglu",
            tie_embeddings=settings.get("tie_word_embeddings", True) is not False)
    except (KeyError, TypeError, ValueError) as error:
        fail(f"{source}/config.json lacks or garbles a field its model needs: {first_line(error)}")
    fits = {
        "hidden_act": settings.get("hidden_act", "silu") == "silu",
        "num_key_value_heads": settings.get("num_key_value_heads", heads) == heads,
        "head_dim": (settings.get("head_dim") or width // heads) * heads == width,
        "intermediate_size": settings.get("intermediate_size") == mlp_hidden_size(gpt_config),
        "rms_norm_eps": math.isclose(settings.get("rms_norm_eps", 0.0), RMS_NORM_EPS),
        "rope_theta": settings.get("rope_theta", ROPE_THETA) == ROPE_THETA,
        "rope_scaling": not settings.get("rope_scaling"),
        # our --bias puts biases on attention and MLP alike; Qwen3's MLP never has any
        "mlp_bias": settings.get("mlp_bias", False) is gpt_config.bias,
        "attention_bias": not (qwen3 and gpt_config.bias),
        "use_sliding_window": not settings.get("use_sliding_window"),
    }
    for name, fit in fits.items():
        if not fit:
            fail(f"{source}: {name}={settings.get(name)!r} has no equivalent in this project's "
                 f"GPT (SiLU gate, every head its own keys and values, RMSNorm eps "
                 f"{RMS_NORM_EPS:g}, RoPE base {ROPE_THETA:g}, one --bias for attention and MLP)")
    return gpt_config


def llama_state_from(take, gpt_config):
    """model.py's state dict from Llama's or Qwen3's tensors: q, k and v (and the SwiGLU gate
    and value) concatenated into our fused matrices, the vocabulary padded."""
    embedding = padded(take("model.embed_tokens.weight"), gpt_config.vocab_size)
    head = embedding if gpt_config.tie_embeddings else \
        padded(take("lm_head.weight"), gpt_config.vocab_size)
    state = {"token_embedding.weight": embedding, "lm_head.weight": head,
             "ln_f.weight": take("model.norm.weight")}
    parts = ["weight", "bias"] if gpt_config.bias else ["weight"]

    def fused(ours, theirs):
        for part in parts:
            state[f"{ours}.{part}"] = torch.cat([take(f"{name}.{part}") for name in theirs])

    for index in range(gpt_config.n_layer):
        theirs, ours = f"model.layers.{index}", f"blocks.{index}"
        state[f"{ours}.ln_1.weight"] = take(f"{theirs}.input_layernorm.weight")
        state[f"{ours}.ln_2.weight"] = take(f"{theirs}.post_attention_layernorm.weight")
        fused(f"{ours}.attn.qkv", [f"{theirs}.self_attn.{n}_proj" for n in "qkv"])
        fused(f"{ours}.attn.proj", [f"{theirs}.self_attn.o_proj"])
        fused(f"{ours}.mlp.fc", [f"{theirs}.mlp.gate_proj", f"{theirs}.mlp.up_proj"])
        fused(f"{ours}.mlp.proj", [f"{theirs}.mlp.down_proj"])
        if gpt_config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                state[f"{ours}.attn.{norm}.weight"] = take(f"{theirs}.self_attn.{norm}.weight")
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


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]


def tokenizer_from_pretrained(source):
    """The tokenizer a --tokenizer names: a `tokenizers` JSON file, a directory holding one (or
    vocab.json + merges.txt), or a Hugging Face model id, from the cache or the Hub. A byte-level
    BPE keeps `source`, so a resumed run may be given the same --tokenizer again."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as error:
            fail(f"--tokenizer {source} is unreadable: {first_line(error)}")
        try:
            tokenizer, directory = BPETokenizer(text), path.parent
        except UserError as error:
            fail(f"--tokenizer {source}: {error}")
    else:
        try:
            directory = path if path.is_dir() else download(str(source), TOKENIZER_FILES)
        except UserError as error:
            fail(f"--tokenizer {source} is not char, byte or bpe, nor a tokenizer file or "
                 f"directory, and {error}")
        tokenizer = read_tokenizer(directory)
    if tokenizer.kind != "bpe":  # export.py's char or byte tokenizer, as it was trained
        return tokenizer
    return BPETokenizer(tokenizer.tokenizer_json, end_of_text_of(tokenizer, directory),
                        str(source))


def end_of_text_of(tokenizer, directory):
    """The id of the end-of-text token: tokenizer_config.json's eos_token where the directory has
    one, else a special token named for it (`BPETokenizer.known_end_of_text`), else None."""
    config = directory / "tokenizer_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        eos = None
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    if isinstance(eos, str) and tokenizer.backend.token_to_id(eos) is not None:
        return tokenizer.backend.token_to_id(eos)
    return tokenizer.known_end_of_text()
