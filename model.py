"""A GPT-2 style language model with optional modern parts, and generation with a key/value cache.

Read top-down: normalisation, rotary positions, attention, MLP, block, the LM head's loss, the
GPT itself, then generation. The defaults are GPT-2 (learned positions, LayerNorm, GELU, tied
head), so every checkpoint of that model loads unchanged; the GPTConfig flags `--pos rope`,
`--norm rmsnorm`, `--qk_norm`, `--mlp relu2|swiglu` and `--tie_embeddings false` swap in the
parts later models use (Llama, nanochat, modded-nanogpt). Notable choices:
- attention goes through `scaled_dot_product_attention`, which picks a fused kernel per device;
- residual projections get a smaller init; the head shares the embedding matrix unless untied;
- the training loss fuses the head with its cross-entropy (`linear_cross_entropy`): the whole
  (tokens x vocabulary) float32 logits never exist;
- `generate_stream` keeps each layer's keys and values, so a new token costs one position of compute.
The model knows nothing of tokenizers, files or training loops.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from config import GPTConfig

IGNORE_INDEX = -100  # the label of a position that is not scored (cross_entropy's default)
ROPE_THETA = 10000.0  # the base of the rotary frequencies, as in Llama
RMS_NORM_EPS = 1e-6  # as in Llama, so an export computes the same numbers
CHUNK_ELEMENTS = 1 << 27  # logits per chunk of the fused loss: 256 MB in bfloat16, 512 MB as float32


@dataclass
class GPTOutput:
    logits: torch.Tensor | None  # None when only the loss was asked for
    loss: torch.Tensor | None = None


class KVCache:
    """Each layer's keys and values for the positions seen so far, preallocated to block_size."""

    def __init__(self, config, batch_size, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled, the same in every layer

    def append(self, layer, keys, values):
        """Store this layer's new keys/values; return all of them, old and new."""
        end = self.length + keys.size(2)
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def build_norm(config):
    """--norm: LayerNorm (GPT-2) or RMSNorm (Llama), which skips the mean and the bias."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=RMS_NORM_EPS)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """--pos rope: the cosines and sines that rotate queries and keys by their position.

    Rotating a query at position m and a key at position n makes their dot product depend on
    m - n only, so attention sees relative distances and no position table is learned. Channel
    i is paired with channel i + head_dim/2 (Llama's "rotate half" layout, so an export needs
    no permutation).
    """

    def __init__(self, head_dim, block_size):
        super().__init__()
        frequencies = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(block_size).float(), frequencies)
        # computed from the config, not saved: a smaller --block_size needs nothing cropped
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start, time):
        return self.cos[start:start + time], self.sin[start:start + time]


def apply_rotary(x, cos, sin):
    """Rotate each (i, i + head_dim/2) channel pair of x (batch, heads, time, head_dim)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # bounded attention logits tolerate the high learning rates of Muon
            head_dim = config.n_embd // config.n_head
            self.q_norm = nn.RMSNorm(head_dim, eps=RMS_NORM_EPS)
            self.k_norm = nn.RMSNorm(head_dim, eps=RMS_NORM_EPS)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cache=None, layer=0, rotary=None):
        batch, time, channels = x.shape
        # (batch, time, 3 * channels) -> 3 x (batch, heads, time, head_dim), in one reshape
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        # with earlier positions cached, a new position sees all of them and the new ones up to
        # itself: one new position needs no mask, several a causal one aligned to the last key
        is_causal = cache is None or cache.length == 0
        mask = None
        if not is_causal and time > 1:
            mask = torch.ones(time, cache.length + time, dtype=torch.bool,
                              device=x.device).tril(cache.length)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.proj_dropout(self.proj(y))


def mlp_hidden_size(config):
    """4 x width; SwiGLU has three matrices instead of two, so it gets 2/3 of that (rounded up
    to a multiple of 32) and about the same parameters, as in Llama."""
    if config.mlp == "swiglu":
        return 32 * math.ceil(8 * config.n_embd / 3 / 32)
    return 4 * config.n_embd


class MLP(nn.Module):
    """--mlp: GELU (GPT-2), ReLU² (squared ReLU: cheaper and sparser, as in modded-nanogpt) or
    SwiGLU (Llama: a SiLU gate times a second projection; `fc` computes gate and value at once)."""

    def __init__(self, config):
        super().__init__()
        hidden = mlp_hidden_size(config)
        self.activation = config.mlp
        outputs = 2 * hidden if config.mlp == "swiglu" else hidden
        self.fc = nn.Linear(config.n_embd, outputs, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.fc(x)
        if self.activation == "swiglu":
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        elif self.activation == "relu2":
            x = F.relu(x).square()
        else:  # GPT-2's tanh GELU; "gelu_pytorch_tanh" in Hugging Face
            x = F.gelu(x, approximate="tanh")
        return self.dropout(self.proj(x))


class Block(nn.Module):
    """Pre-norm: each sub-layer sees a normalised input and adds to the residual stream."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = build_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, rotary=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rotary)
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------- the head and its loss, fused
# The plain loss (`F.cross_entropy` of `lm_head(hidden)`) keeps the whole (tokens x vocabulary)
# logits, their float32 copy and its gradient alive: for GPT-2 124M at batch 16 x 1024, 3.3 GB
# each in float32. `linear_cross_entropy` takes the rows in chunks instead: a chunk's logits are
# computed in the matmul dtype (autocast's, if on), its log-softmax in float32, and the gradients
# of the mean loss with respect to the hidden states and the head's weight right away, in the
# forward pass, kept for backward. Only one chunk of logits exists at a time. The result matches
# the plain loss within float rounding (the chunks are summed in another order); it is plain
# tensor code inside one `autograd.Function`, so `torch.compile` traces it like any other.

def linear_cross_entropy(hidden, weight, labels, dtype):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, in chunks of rows.

    hidden: (tokens, width); weight: (vocabulary, width), a tied one included; labels: (tokens,),
    IGNORE_INDEX where a position is not scored. The logits are computed in `dtype`.
    """
    grad_enabled = torch.is_grad_enabled()
    wanted = (grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, labels, dtype, wanted)


def chunk_rows(tokens, vocab_size):
    """Rows per chunk: a power-of-two number of equal chunks, each within CHUNK_ELEMENTS logits."""
    chunks = 1 << max(0, math.ceil(math.log2(max(1, tokens * vocab_size) / CHUNK_ELEMENTS)))
    return max(1, math.ceil(tokens / chunks))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype, wanted):
        hidden_grad, weight_grad = wanted  # which of hidden and weight need a gradient
        rows = chunk_rows(hidden.size(0), weight.size(0))
        matrix = weight.to(dtype)
        scored = labels != IGNORE_INDEX
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
                None, None, None)


class GPT(nn.Module):
    def __init__(self, config, vocab_limit=None):
        super().__init__()
        self.config = config
        # ids from vocab_limit up only pad the vocabulary (to a multiple of 64): never predicted
        self.vocab_limit = vocab_limit or config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        # positions: a learned table added to the input (GPT-2), or rotations inside attention
        self.position_embedding = None
        self.rotary = None
        if config.pos == "rope":
            self.rotary = RotaryEmbedding(config.n_embd // config.n_head, config.block_size)
        else:
            self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # The map into the embedding space and back out is one matrix, which saves
            # vocab_size * n_embd parameters and trains rare tokens' rows from both ends.
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # Each block adds two projections to the residual stream; scaling their init by
        # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth (GPT-2).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, labels=None, cache=None, return_logits=True):
        """Logits for every position; with `labels`, the mean cross-entropy (labels[t] targets t).

        With labels and `return_logits=False` (training, scoring), only the loss is computed, by
        `linear_cross_entropy`, in chunks that never hold the whole float32 logits.
        """
        start = cache.length if cache is not None else 0
        time = input_ids.size(1)
        if start + time > self.config.block_size:
            raise ValueError(f"input of {start + time} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(start, start + time,
                                                         device=input_ids.device))
        rotary = self.rotary(start, time) if self.rotary is not None else None
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, rotary)
        if cache is not None:
            cache.length += time
        x = self.ln_f(x)
        if labels is not None and not return_logits:
            head = self.lm_head.weight
            if self.vocab_limit < head.size(0):  # the padded rows take no probability mass
                head = head[:self.vocab_limit]
            loss = linear_cross_entropy(x.flatten(0, 1), head, labels.flatten(),
                                        _activation_dtype(x.device, head))
            return GPTOutput(logits=None, loss=loss)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            # padded ids take no probability mass (an imported GPT-2's untrained padded rows
            # would otherwise take much of it); unpadded, the slice is the whole tensor, no copy
            scored = logits[..., :self.vocab_limit].float()
            loss = F.cross_entropy(scored.reshape(-1, scored.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return GPTOutput(logits=logits, loss=loss)

    @torch.inference_mode()
    def generate_stream(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, vocab_limit=None):
        """Yield (batch,) tensors of new token ids, one position at a time.

        The model sees at most block_size tokens. When the context is full, its oldest quarter
        is dropped and the cache is rebuilt from the rest, so the cost of sliding is paid once
        every block_size/4 tokens. `use_cache=False` recomputes the same windows from scratch:
        the reference the cache must agree with. Padded ids (from the model's own vocab_limit
        up) are never drawn: a smaller `vocab_limit` narrows the draw, a larger one cannot widen it.
        """
        vocab_limit = min(vocab_limit or self.vocab_limit, self.vocab_limit)
        block_size = self.config.block_size
        keep = block_size - max(1, block_size // 4)
        batch, prompt_length = input_ids.shape
        sequence = torch.empty(batch, prompt_length + max_new_tokens, dtype=torch.long,
                               device=input_ids.device)  # filled as tokens are drawn
        sequence[:, :prompt_length] = input_ids
        length = prompt_length
        context_start = max(0, length - block_size)
        new_positions = length - context_start  # tokens the next forward must process
        cache = None
        if use_cache:
            cache = KVCache(self.config, batch, input_ids.device,
                            _activation_dtype(input_ids.device, self.token_embedding.weight))
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(sequence[:, length - new_positions:length], cache=cache).logits
            else:
                logits = self(sequence[:, context_start:length]).logits
            next_token = sample_next_token(logits[:, -1, :vocab_limit], temperature, top_k, top_p,
                                           generator)
            sequence[:, length] = next_token
            length += 1
            yield next_token
            new_positions = 1
            if length - context_start > block_size:
                context_start = length - keep
                new_positions = keep
                if cache is not None:
                    cache.length = 0  # rebuilt from the kept tokens by the next forward

    def generate(self, input_ids, max_new_tokens, **options):
        """The prompt followed by `max_new_tokens` generated ids, as one (batch, time) tensor."""
        new_tokens = list(self.generate_stream(input_ids, max_new_tokens, **options))
        if not new_tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _activation_dtype(device, weight):
    """The dtype keys and values are computed in: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One id per row of `logits`: greedy at temperature 0, else sampled after top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probabilities = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones already cover top_p; the first always stays
        drop = probabilities.cumsum(dim=-1) - probabilities > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


def build_model(gpt_config: GPTConfig, vocab_limit=None):
    """The GPT; `vocab_limit` is the tokenizer's vocabulary where the model's is padded beyond it."""
    return GPT(gpt_config, vocab_limit)


def crop_block_size(state_dict, block_size):
    """A model's weights for a smaller block_size: the learned position table keeps its first
    rows (RoPE has no table, so its weights do not depend on the block size)."""
    state = dict(state_dict)
    if "position_embedding.weight" in state:
        state["position_embedding.weight"] = state["position_embedding.weight"][:block_size]
    return state


def count_parameters(model):
    """Trainable parameters; the tied LM head is counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_token(model):
    """Training FLOPs per token, by the convention nanoGPT and PaLM use for MFU.

    6 per weight that multiplies an activation (2 forward, 4 backward): every parameter except
    lookups, which are the position table and, when the head is untied, the token embedding (a
    tied one counts once, as the head's matmul). Plus attention's scores and weighted sum,
    12 * layers * width * context.
    """
    config = model.config
    weights = count_parameters(model)
    if model.position_embedding is not None:
        weights -= model.position_embedding.weight.numel()
    if not config.tie_embeddings:
        weights -= model.token_embedding.weight.numel()
    return 6 * weights + 12 * config.n_layer * config.n_embd * config.block_size
