"""The GPT model: shapes, loss, causality, initialisation and cached generation."""

import math

import pytest
import torch
from torch.nn import functional as F

from config import GPTConfig
from conftest import TINY_VOCAB, tiny_model
from model import build_model, count_parameters, flops_per_token, sample_next_token


def random_ids(batch, time, seed=1, vocab=TINY_VOCAB):
    return torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


def test_logits_have_one_row_of_vocabulary_scores_per_position():
    output = tiny_model()(input_ids=random_ids(3, 11))
    assert output.logits.shape == (3, 11, TINY_VOCAB)


def test_labels_none_gives_loss_none():
    assert tiny_model()(input_ids=random_ids(2, 5)).loss is None


def test_loss_is_the_cross_entropy_of_each_position_against_its_label():
    model = tiny_model()
    x, y = random_ids(2, 8, seed=1), random_ids(2, 8, seed=2)
    output = model(input_ids=x, labels=y)
    expected = F.cross_entropy(output.logits.reshape(-1, TINY_VOCAB), y.reshape(-1))
    assert output.loss.shape == ()
    assert torch.allclose(output.loss, expected)


def test_the_initial_loss_is_close_to_ln_vocab_size():
    model = tiny_model(vocab_size=200, block_size=32, n_embd=64)
    x, y = random_ids(8, 32, seed=1, vocab=200), random_ids(8, 32, seed=2, vocab=200)
    loss = model(input_ids=x, labels=y).loss.item()
    assert loss == pytest.approx(math.log(200), abs=0.05)


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = tiny_model()
    x = random_ids(1, 16)
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % TINY_VOCAB
    before, after = model(input_ids=x).logits, model(input_ids=changed).logits
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-6, rtol=0)


def test_inputs_longer_than_block_size_raise_value_error():
    model = tiny_model(block_size=16)
    model(input_ids=random_ids(1, 16))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(input_ids=random_ids(1, 17))


def test_the_lm_head_shares_the_token_embedding_matrix():
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight


def test_parameter_count_matches_the_gpt2_formula_counting_tied_weights_once():
    vocab, block, layers, width = 50, 16, 3, 32
    model = tiny_model(vocab_size=vocab, block_size=block, n_layer=layers, n_embd=width)
    # per block: two LayerNorms (4C), qkv (3C^2 + 3C), proj (C^2 + C), MLP (8C^2 + 5C)
    per_block = 12 * width**2 + 13 * width
    expected = vocab * width + block * width + layers * per_block + 2 * width
    assert count_parameters(model) == expected
    no_bias = tiny_model(vocab_size=vocab, block_size=block, n_layer=layers, n_embd=width,
                         bias=False)
    assert count_parameters(no_bias) == expected - layers * (11 * width) - width


def test_flops_per_token_of_gpt2_124m_is_the_hand_counted_nanogpt_convention():
    """6 x (the 124M parameters less the 1024 x 768 position table) + 12 x 12 x 768 x 1024."""
    config = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):  # the shapes alone: no memory, no initialisation
        model = build_model(config)
    embedding = 50304 * 768
    per_layer = 2 * 768 * 2 + (768 * 3 * 768 + 3 * 768) + (768 * 768 + 768) \
        + (768 * 4 * 768 + 4 * 768) + (4 * 768 * 768 + 768)  # 2 LayerNorms, qkv, proj, fc, proj
    weights = embedding + 12 * per_layer + 2 * 768  # the tied head once; ln_f
    assert flops_per_token(model) == 6 * weights + 12 * 12 * 768 * 1024


def test_initialisation_uses_std_002_and_scaled_residual_projections():
    model = tiny_model(n_layer=4, n_embd=64, vocab_size=500)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 4)
    for block in model.blocks:
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert torch.count_nonzero(block.mlp.fc.bias) == 0


# ---------------------------------------------------------------------------------- generation

def sharper_model(**overrides):
    """A model whose logits are far apart, so greedy choices do not hinge on rounding."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
    return model


@pytest.mark.parametrize("prompt_length, new_tokens", [(3, 10), (3, 45), (16, 20)],
                         ids=["within-block", "sliding-past-block", "full-prompt"])
def test_cached_greedy_generation_equals_uncached_greedy_generation(prompt_length, new_tokens):
    model = sharper_model(block_size=16)
    prompt = random_ids(2, prompt_length)
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_length + new_tokens)
    assert torch.equal(cached[:, :prompt_length], prompt)
    assert torch.equal(cached, uncached)


def test_a_prompt_longer_than_block_size_is_cropped_not_rejected():
    model = sharper_model(block_size=16)
    prompt = random_ids(1, 40)
    cached = model.generate(prompt, 5, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 5, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # the first new token depends only on the last block_size tokens of the prompt
    assert torch.equal(model.generate(prompt[:, -16:], 1, temperature=0)[:, -1], cached[:, 40])


def test_greedy_generation_is_the_argmax_of_a_full_forward():
    model = sharper_model(block_size=16)
    prompt = random_ids(2, 5)
    generated = model.generate(prompt, 8, temperature=0)
    for t in range(5, 13):
        expected = model(input_ids=generated[:, :t]).logits[:, -1].argmax(dim=-1)
        assert torch.equal(generated[:, t], expected)


def test_top_k_1_sampling_equals_greedy():
    model = sharper_model(block_size=16)
    prompt = random_ids(2, 4)
    greedy = model.generate(prompt, 30, temperature=0)
    top_1 = model.generate(prompt, 30, temperature=1.0, top_k=1,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_1, greedy)


def test_sampling_with_the_same_generator_seed_repeats():
    model = sharper_model(block_size=16)
    prompt = random_ids(1, 4)
    runs = [model.generate(prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(s))
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_top_p_keeps_only_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    drawn = sample_next_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.7, so the second token is needed; not more


def test_top_k_keeps_only_the_k_likeliest():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).repeat(2000, 1)
    drawn = sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}


def test_vocab_limit_keeps_padded_ids_from_being_generated():
    model = sharper_model(vocab_size=64)
    prompt = random_ids(4, 3, vocab=40)

    def generate(**limit):
        return model.generate(prompt, 40, temperature=2.0, **limit,
                              generator=torch.Generator().manual_seed(0))

    assert int(generate().max()) >= 40  # without the limit, ids past it do get drawn
    assert int(generate(vocab_limit=40).max()) < 40


def padded_model_that_prefers_padding(vocab_limit=40, vocab_size=64):
    """A model whose vocabulary is padded from `vocab_limit` to `vocab_size` (as BPE's is), its
    padded ids made the likeliest by far: any draw that looks past the limit lands on one."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2,
                                  n_embd=32), vocab_limit=vocab_limit).eval()

    def boost_padding(module, args, output):
        output.logits[..., vocab_limit:] += 1e4

    model.register_forward_hook(boost_padding)
    return model


@pytest.mark.parametrize("vocab_limit", [None, 64, 100])
def test_generation_never_returns_a_padded_id_whatever_vocab_limit_the_caller_passes(vocab_limit):
    model = padded_model_that_prefers_padding()
    prompt = random_ids(2, 4, vocab=40)
    greedy = model.generate(prompt, 12, temperature=0, vocab_limit=vocab_limit)
    sampled = model.generate(prompt, 12, temperature=1.0, vocab_limit=vocab_limit,
                             generator=torch.Generator().manual_seed(0))
    streamed = torch.stack(list(model.generate_stream(prompt, 12, top_p=0.9,
                                                      vocab_limit=vocab_limit)), dim=1)
    for ids in (greedy[:, 4:], sampled[:, 4:], streamed):
        assert int(ids.max()) < 40
    for t in range(4, 16):  # greedy: the argmax over the real vocabulary only
        expected = model(input_ids=greedy[:, :t]).logits[:, -1, :40].argmax(dim=-1)
        assert torch.equal(greedy[:, t], expected)


def test_a_smaller_vocab_limit_than_the_models_narrows_generation_further():
    model = padded_model_that_prefers_padding()
    generated = model.generate(random_ids(2, 4, vocab=40), 12, temperature=1.0, vocab_limit=30,
                               generator=torch.Generator().manual_seed(0))
    assert int(generated[:, 4:].max()) < 30
