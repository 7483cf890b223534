"""Configuration: the two dataclasses, the command line built from them, and their validation.

`GPTConfig` describes the network, `TrainConfig` the run. Every field is a `--flag` of the same
name and a key of a `--config` recipe (a TOML file); `parse_args` reads only what the user gave
(flags over the recipe), and `apply_args_to_configs` lays those values over the defaults (or over
a checkpoint's saved configs on resume). `validate` checks values that no type can check, and
`configs_to_toml` writes a recipe back out (`--print_config`). A default the user did not set that
conflicts with flags they did set adapts, with a note (`adapt_defaults`).

What counts as the user's mistake is defined here too, once, for every module and command:
`UserError`, raised through `fail`, is a mistake in the user's input (a flag, a recipe, a file or
value they gave); `ArgumentParser` makes argparse's mistakes UserErrors. It lives with the flags
because most mistakes are flags, and because this file imports nothing of the package: every
module of gpt_train/ and every command can import it from here. Turning it into one line and exit
status 2 is gpt_train/cli.py's job (with the machine's failures, exit status 1, and signals); how
flags are reconciled with a checkpoint's configs is configure.py's; what the flags *do* is left to
the modules that use them.
"""

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import re
import tomllib
from dataclasses import dataclass



@dataclass
class GPTConfig:
    vocab_size: int = 128  # replaced by the tokenizer's vocabulary when the data is known
    block_size: int = 128  # longest context the model attends to, in tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; must divide n_embd
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # dropout probability; 0 = none
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    pos: str = "learned"  # positions: learned, a table as in GPT-2, or rope, rotary as in Llama
    norm: str = "layernorm"  # layernorm as in GPT-2, or rmsnorm as in Llama
    qk_norm: bool = False  # RMSNorm each head's queries and keys before attention
    mlp: str = "gelu"  # MLP activation: gelu as in GPT-2, relu2 = squared ReLU, or swiglu as in Llama
    tie_embeddings: bool = True  # the LM head shares the token embedding matrix, as in GPT-2


@dataclass
class TrainConfig:
    # data
    data: str = ""  # a text file or directory of *.txt; or documents: .jsonl[.gz], .parquet, or a directory or glob of them; empty = the built-in corpus
    text_field: str = "text"  # the jsonl key or parquet column that holds a document's text
    val_data: str = ""  # a held-out corpus to validate on, read as --data is; empty = a split of --data
    tokenizer: str = "char"  # char, byte or bpe; or a pretrained tokenizer.json, its directory, or a model id like gpt2
    bpe_vocab_size: int = 4096  # vocabulary size when --tokenizer bpe trains one
    val_fraction: float = 0.1  # the last fraction of the token stream is the validation split, whole documents
    cache_dir: str = ""  # token cache for text files; empty = ~/.cache/gpt-train/tokens
    num_proc: int = 0  # processes that prepare a corpus of documents; 0 = every core
    num_workers: int = 0  # DataLoader worker processes
    # optimisation
    batch_size: int = 16  # sequences per micro-batch, per process under torchrun
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-3  # peak learning rate; AdamW's, with --optimizer muon
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's two betas
    weight_decay: float = 0.1  # AdamW's, on weight matrices and embeddings only
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    warmup_iters: int = 100  # steps of linear warmup to the peak learning rate
    max_iters: int = 2000  # optimizer steps in the whole run
    min_lr_ratio: float = 0.1  # the decay ends at this fraction of the peak learning rate
    lr_schedule: str = "cosine"  # cosine: warmup, then decay; wsd: warmup, constant, then decay
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps, where the rate decays
    lr_decay_iters: int = 0  # the step the decay ends at; 0 = --max_iters; a resume keeps its run's
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest
    muon_learning_rate: float = 0.02  # peak learning rate of Muon; --learning_rate is AdamW's
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.0  # decoupled weight decay of the Muon matrices
    # logging, evaluation, checkpoints
    log_iter: int = 50  # print and log the training loss every N steps
    eval_iter: int = 500  # validate every N steps, and at the last
    eval_batches: int = 20  # batches of the validation split per evaluation
    sample_tokens: int = 0  # print a sample of this many tokens at each evaluation; 0 = off
    eval_tasks: str = ""  # benchmark tasks to score at each evaluation, e.g. hellaswag,piqa
    tasks_dir: str = ""  # where --eval_tasks' files are: <task>.jsonl anywhere below it
    eval_tasks_limit: int = 0  # score the first N items of each task; 0 = all
    save_iter: int = 1000  # write gpt_step{N}.pt every N steps, and at the last
    checkpoint_dir: str = "checkpoints"  # the run directory: checkpoints, metrics.jsonl
    keep_last: int = 0  # keep only the newest K step checkpoints; 0 = keep all
    resume: str = ""  # a checkpoint to continue, "latest", or "auto": latest if any, else a new run
    init_from: str = ""  # a checkpoint, GPT-2 directory or model id like gpt2 to fine-tune from
    lora_rank: int = 0  # train rank-R LoRA adapters on frozen weights; 0 = train every weight
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    early_stop_patience: int = 0  # stop after N evaluations without improvement; 0 = never
    early_stop_min_delta: float = 0.0  # the least drop in validation loss that counts as one
    skip_nonfinite: int = 0  # skip up to this many batches with a non-finite loss instead of stopping
    overwrite: bool = False  # replace the run in --checkpoint_dir: its files go once this run starts
    # runtime
    seed: int = 1337  # seeds Python, numpy and torch; fixes the data order
    threads: int = 0  # CPU threads of torch's operations; 0 = torch's choice, one per core
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # ddp: every rank holds the whole model; fsdp: each rank holds 1/N of it
    cuda_graphs: bool = True  # on CUDA, record the whole training step once and replay it
    fused_loss: bool = True  # compute the training loss in chunks, without the whole float32 logits
    peak_flops: float = 0.0  # the device's peak FLOP/s for MFU, counted as nanoGPT and PaLM do; 0 = look it up
    log_to: str = "jsonl"  # where metrics go, comma-separated: jsonl, tensorboard, wandb


TOKENIZERS = ("char", "byte", "bpe")
LOG_DESTINATIONS = ("jsonl", "tensorboard", "wandb")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
PARALLEL = ("ddp", "fsdp")
ARCHITECTURE_CHOICES = {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
                        "mlp": ("gelu", "relu2", "swiglu")}
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:\d+)?")
MAX_SEED = 2**32 - 1  # numpy's generators take seeds below 2**32
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "dropout")
CHOICES = {"dtype": DTYPES, "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
           "parallel": PARALLEL, **ARCHITECTURE_CHOICES}


# ------------------------------------------ the command line, and what counts as the user's mistake

class UserError(Exception):
    """A mistake in the user's input: reported as one line and exit status 2, never a traceback."""

    exit_status = 2


def fail(message):
    raise UserError(message)


def shown_default(value):
    """A default as a user types it after its flag: true/false, `0.9 0.95`, and `empty` for ''."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return " ".join(map(shown_default, value))
    return "empty" if value == "" else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with `(default: ...)`, unless it says its default itself (one that
    is None, such as sample.py's --prompt, must: what happens without the flag is no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        shown = shown_default(action.default).replace("%", "%%")  # help strings are %-formatted
        return f"{text} (default: {shown})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one line and exit status 2, and `-1e-3` or `-inf`
    after a flag is a value (argparse itself takes only `-1` and `-0.5` for negative numbers);
    --help ends each option with its default as it is typed (`HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message):
        # argparse prints usage and exits 2 itself; one line suits a tool people script
        fail(message)


def parse_bool(text):
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_comments(config_class):
    """The `# comment` written beside each field in the class body: the flag's --help text."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        match = re.match(r"\s+(\w+):.*?#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def _add_field(parser, config_field, comment=""):
    default = config_field.default
    name = f"--{config_field.name}"
    help_text = f"{comment} (default: {shown_default(default)})".strip()
    annotation = config_field.type
    if annotation is bool or annotation == "bool":
        parser.add_argument(name, type=parse_bool, metavar="true|false", help=help_text)
    elif isinstance(default, tuple):
        parser.add_argument(name, type=type(default[0]), nargs=len(default), help=help_text)
    else:
        parser.add_argument(name, type=type(default), help=help_text)


def build_parser(description=None):
    parser = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="PATH.toml",
                        help="a recipe: a TOML file of `field = value` lines; flags override it "
                        "(default: none)")
    for config_class in (GPTConfig, TrainConfig):
        group = parser.add_argument_group(config_class.__name__)
        comments = _field_comments(config_class)
        for config_field in dataclasses.fields(config_class):
            _add_field(group, config_field, comments.get(config_field.name, ""))
    return parser


@dataclass(frozen=True)
class Recipe:
    """A --config file: its path and the fields it set that no flag overrode."""

    path: str
    keys: frozenset


def parse_args(argv=None, parser=None):
    """One --flag per config field, over a --config recipe's values.

    Only the fields the user gave (typed, or in the recipe) appear in the result; `args.config`,
    when given, is a `Recipe`, so that `check_configs` can name the file a bad value came from.
    """
    if parser is None:
        parser = build_parser("Train a small GPT on a text corpus.")
        parser.add_argument("--print_config", action="store_true",
                            help="print the resolved configuration as a TOML recipe and exit")
    args = parser.parse_args(argv)
    if "config" in args:
        recipe = {k: v for k, v in read_recipe(args.config).items() if k not in args}
        vars(args).update(recipe)
        args.config = Recipe(args.config, frozenset(recipe))
    return args


# Fields a recipe may not set: what destroys files is asked for on the command line, each time.
COMMAND_LINE_ONLY = ("overwrite",)
UTF8_BOM, UTF16_BOMS = b"\xef\xbb\xbf", (b"\xff\xfe", b"\xfe\xff")


def read_recipe(path):
    """The fields a TOML recipe sets, each checked against its field's type.

    A UTF-8 byte-order mark (what some Windows editors put first) is read past; `overwrite = true`
    is refused: a recipe is reused and shared, and a run that replaces files says so on its own
    command line (`overwrite = false`, which --print_config wrote before, is harmless)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        fail(f"--config {path}: cannot read it: {error.strerror}")
    if data.startswith(UTF16_BOMS):
        fail(f"{path}: the file is UTF-16 text; save it as UTF-8 (TOML files are UTF-8)")
    try:
        values = tomllib.loads(data.removeprefix(UTF8_BOM).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        fail(f"{path}: not a valid TOML file: {error}")
    for key in COMMAND_LINE_ONLY:
        if values.get(key) is True:
            fail(f"{path}: {key} = true is refused in a recipe: replacing a run's files is asked "
                 f"for on the command line (--{key} true); delete the line")
    fields = {f.name: f for config_class in (GPTConfig, TrainConfig)
              for f in dataclasses.fields(config_class)}
    recipe = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(f"{path}: unknown key {key!r}{hint}; a recipe sets GPTConfig/TrainConfig fields")
        try:
            recipe[key] = typed_value(key, value, fields[key].default)
        except UserError as error:
            fail(f"{path}: {error}")
    return recipe


def typed_value(key, value, default):
    """`value` as the type of the field whose default is `default` (an int is a fine float, a
    list a fine tuple), or a UserError naming the key: for recipes and for saved configs."""
    def is_number(item):
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(default) and \
                all(map(is_number, value)):
            return tuple(float(item) for item in value)
        expected = f"a list of {len(default)} numbers"
    elif isinstance(default, float):
        if is_number(value):
            return float(value)
        expected = "a number"
    elif type(value) is type(default):  # an int field takes no float and no bool
        return value
    else:
        expected = {bool: "true or false", int: "an integer", str: "a string"}[type(default)]
    fail(f"{key} must be {expected}, got {value!r}")


def apply_args_to_configs(args, gpt_config, train_config):
    """Set the fields the user gave (flags or recipe); leave every other field as it is."""
    given = vars(args)
    for config in (gpt_config, train_config):
        for config_field in dataclasses.fields(config):
            if config_field.name in given:
                value = given[config_field.name]
                setattr(config, config_field.name, tuple(value) if isinstance(value, list) else value)
    return gpt_config, train_config


def check_configs(args, gpt_config, train_config):
    """`validate`, and --log_to; a mistake whose flag the --config file set names that file."""
    try:
        validate(gpt_config, train_config)
        unknown = [name for name in train_config.log_to.split(",") if name not in LOG_DESTINATIONS]
        if unknown:
            fail(f"unknown --log_to {unknown[0]!r}; give one or more of "
                 f"{', '.join(LOG_DESTINATIONS)}, comma-separated")
    except UserError as error:
        name_the_recipe(args, error)


def name_the_recipe(args, error):
    """Re-raise `error`, a UserError naming a flag, naming the --config file when it set that flag."""
    recipe = vars(args).get("config")
    if recipe and recipe.keys & set(re.findall(r"--(\w+)", str(error))):
        fail(f"{recipe.path}: {error}")
    raise error


def configs_to_toml(gpt_config, train_config):
    """The configs as a recipe that --config reads back: every field, with its help as a comment.

    vocab_size is left out: a new run takes it from its tokenizer, a resumed one from its
    checkpoint; so is overwrite, which a recipe may not set (`read_recipe`).
    """
    lines = ["# python train.py --config THIS_FILE  (flags given as well override these values)"]
    for config in (gpt_config, train_config):
        lines += ["", f"# {type(config).__name__}"]
        comments = _field_comments(type(config))
        for config_field in dataclasses.fields(config):
            if config_field.name == "vocab_size" or config_field.name in COMMAND_LINE_ONLY:
                continue
            line = f"{config_field.name} = {_toml_value(getattr(config, config_field.name))}"
            comment = comments.get(config_field.name)
            lines.append(f"{line}  # {comment}" if comment else line)
    return "\n".join(lines) + "\n"


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    return repr(value)  # ints, and floats (repr round-trips; inf and nan are TOML too)


def config_from_dict(config_class, values):
    """Rebuild a config saved as a plain dict (unknown keys from other versions are ignored).

    A value of the wrong type (a hand-edited checkpoint) is a UserError naming the field, so a
    saved config is checked as strictly as a typed flag before `validate` checks its range.
    """
    if not isinstance(values, dict):
        fail(f"expected a dict of {config_class.__name__} fields, got {type(values).__name__}")
    return config_class(**{f.name: typed_value(f.name, values[f.name], f.default)
                           for f in dataclasses.fields(config_class) if f.name in values})


# What no type can say about a field's value: the ranges and choices `validate` checks.
POSITIVE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size",
            "grad_accum_steps", "max_iters", "log_iter", "eval_iter", "eval_batches", "save_iter",
            "bpe_vocab_size", "learning_rate", "muon_learning_rate", "lora_alpha")
NOT_NEGATIVE = ("warmup_iters", "num_workers", "num_proc", "keep_last", "skip_nonfinite",
                "sample_tokens", "lora_rank", "early_stop_patience", "weight_decay", "grad_clip",
                "peak_flops", "muon_weight_decay", "early_stop_min_delta", "lr_decay_iters",
                "eval_tasks_limit", "threads")
# name -> (low, high, whether low is allowed, whether high is allowed)
INTERVALS = {"dropout": (0, 1, True, False), "muon_momentum": (0, 1, True, False),
             "lora_dropout": (0, 1, True, False), "betas": (0, 1, True, False),
             "min_lr_ratio": (0, 1, True, True), "decay_fraction": (0, 1, False, True),
             "val_fraction": (0, 1, False, False),
             "seed": (0, MAX_SEED, True, True)}  # numpy's generators take seeds below 2**32


def validate(gpt_config, train_config):
    """Check values the types cannot: one clear UserError for the first problem found."""
    g, t = gpt_config, train_config
    for config in (g, t):
        for config_field in dataclasses.fields(config):
            _check_value(config_field.name, getattr(config, config_field.name))
    if g.n_embd % g.n_head != 0:
        fail(f"--n_embd ({g.n_embd}) must be divisible by --n_head ({g.n_head})")
    if g.pos == "rope" and g.n_embd // g.n_head % 2:
        fail(f"--pos rope rotates channel pairs: the head size (--n_embd / --n_head = "
             f"{g.n_embd // g.n_head}) must be even")
    if t.learning_rate * t.weight_decay >= 1:  # AdamW scales weights by 1 - lr * wd every step
        fail(f"--weight_decay {t.weight_decay:g} times --learning_rate {t.learning_rate:g} must be "
             f"below 1: each step multiplies the weights by 1 - their product")
    if t.warmup_iters > t.max_iters:
        fail(f"--warmup_iters ({t.warmup_iters}) must not exceed --max_iters ({t.max_iters})")
    if 0 < t.lr_decay_iters < t.warmup_iters:
        fail(f"--lr_decay_iters ({t.lr_decay_iters}) must be 0 (= --max_iters) or at least "
             f"--warmup_iters ({t.warmup_iters}): the decay follows the warmup")
    if t.device != "auto":
        check_device(t.device)
    if not t.checkpoint_dir.strip():
        fail("--checkpoint_dir must not be empty (use . for the current directory)")
    if not t.tokenizer.strip():  # any other value names a pretrained tokenizer (dataset.py)
        fail(f"--tokenizer must not be empty; give one of {', '.join(TOKENIZERS)}, or a "
             f"pretrained tokenizer")
    if not t.text_field:
        fail("--text_field must not be empty: name the key or column that holds the text")
    if t.eval_tasks and not t.tasks_dir:
        fail("--eval_tasks needs --tasks_dir, the directory holding the tasks' .jsonl files")
    if t.resume and t.init_from:
        fail("--resume continues a run and --init_from starts a new one: give only one")
    # what a sharded model (--parallel fsdp) cannot do
    if t.parallel == "fsdp" and t.dtype == "float16":
        fail("--dtype float16 cannot run with --parallel fsdp: its gradient scaler does not "
             "work on sharded gradients; use --dtype bfloat16, which needs no scaler")
    if t.parallel == "fsdp" and t.lora_rank:
        fail("--lora_rank cannot run with --parallel fsdp: the adapters are not sharded; use "
             "--parallel ddp")


def _check_value(name, value):
    """One field's value against its rule above; every number must be finite (nan and inf pass
    every comparison the wrong way)."""
    for number in value if isinstance(value, tuple) else (value,):
        if isinstance(number, float) and not math.isfinite(number):
            fail(f"--{name} must be a finite number, got {number}")
    shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
    if name in POSITIVE and value <= 0:
        fail(f"--{name} must be positive, got {value}")
    if name in NOT_NEGATIVE and value < 0:
        fail(f"--{name} must not be negative, got {value}")
    if name in INTERVALS:
        low, high, low_allowed, high_allowed = INTERVALS[name]
        for number in value if isinstance(value, tuple) else (value,):
            if not ((low <= number if low_allowed else low < number) and
                    (number <= high if high_allowed else number < high)):
                fail(f"--{name} must be in {'[' if low_allowed else '('}{low}, {high}"
                     f"{']' if high_allowed else ')'}, got {shown}")
    choices = CHOICES.get(name)
    if choices and value not in choices:
        fail(f"unknown --{name} {value!r}; choose one of {', '.join(choices)}")


def check_device(name):
    """A device name: cpu, cuda, cuda:N or mps (whether this machine has it is checked later)."""
    if not DEVICE_PATTERN.fullmatch(name):
        fail(f"unknown --device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def adapt_defaults(gpt_config, train_config, given):
    """Defaults the user did not set that conflict with flags they did set give way, with a note.

    `given` holds the flags the user typed. Returns the notes to print; flags the user typed
    are never changed (a conflict between two of them is `validate`'s error).
    """
    notes = []
    t, g = train_config, gpt_config
    if "warmup_iters" not in given and t.warmup_iters >= t.max_iters:  # equal: no step decays
        warmup = t.max_iters // 10
        relation = "exceeds" if t.warmup_iters > t.max_iters else "equals"
        notes.append(f"--warmup_iters {t.warmup_iters} (the default) {relation} --max_iters "
                     f"{t.max_iters}, leaving no step to decay the learning rate; using "
                     f"--warmup_iters {warmup}, a tenth of the run")
        t.warmup_iters = warmup
    if g.n_head > 0 and g.n_embd > 0 and g.n_embd % g.n_head:
        if "n_head" not in given:
            heads = max(h for h in range(1, g.n_head + 1) if g.n_embd % h == 0)
            notes.append(f"--n_head {g.n_head} (the default) does not divide --n_embd {g.n_embd}; "
                         f"using --n_head {heads}")
            g.n_head = heads
        elif "n_embd" not in given:
            width = -(-g.n_embd // g.n_head) * g.n_head
            notes.append(f"--n_embd {g.n_embd} (the default) is not divisible by --n_head "
                         f"{g.n_head}; using --n_embd {width}")
            g.n_embd = width
    return notes


def config_to_dict(config):
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

