"""An export runs in transformers' own tokenizer, `generate` and pipeline, whatever its tokenizer.

One tiny model per tokenizer kind (char, byte, BPE) is trained and exported once per module; the
tests then use only what a Hugging Face user would: `AutoTokenizer`, `AutoModelForCausalLM` and
`pipeline("text-generation")` on the export directory, against our tokenizer and generation.
"""

import pytest
import torch

import export
import train
from gpt_train.checkpoint import model_from_checkpoint
from conftest import TINY_TEXT, tiny_argv, write_corpus
from gpt_train.generation import generate_text

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

KINDS = ("char", "byte", "bpe")
# Text the byte-level vocabulary must read as well: CJK, emoji joined by zero-width joiners, a
# letter with a combining accent, a ligature, controls and spaces at both ends.
ANY_TEXT = "  中文字符，汉字。 😀👩\u200d👩\u200d👧 cafe\u0301 ﬁ \x00\x7f\r\n\t "


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`exported(kind)`: (our model, our tokenizer, the export directory), trained once per kind."""
    built = {}

    def train_and_export(kind):
        if kind not in built:
            root = tmp_path_factory.mktemp(f"export-{kind}")
            data = write_corpus(root)
            train.train(tiny_argv(root / "checkpoints", data, tokenizer=kind, bpe_vocab_size=300,
                                  max_iters=30, eval_iter=30, save_iter=30, log_iter=30))
            checkpoint_path = root / "checkpoints" / "gpt_final.pt"
            out = export.export(checkpoint_path, root / "hf")
            model, tokenizer, _ = model_from_checkpoint(checkpoint_path)
            built[kind] = model, tokenizer, out
        return built[kind]

    return train_and_export


@pytest.mark.parametrize("kind", KINDS)
def test_autotokenizer_encodes_the_training_text_to_our_ids_and_decodes_it_back(exported, kind):
    _, tokenizer, out = exported(kind)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    # leading and trailing whitespace and blank lines must survive as they are
    text = "  " + TINY_TEXT[1000:2000] + "\n\n \n"
    ids = hf_tokenizer.encode(text, verbose=False)
    assert ids == tokenizer.encode(text).tolist()
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.model_max_length == 16


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_byte_level_exports_encode_any_text_to_our_ids(exported, kind):
    _, tokenizer, out = exported(kind)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer.encode(ANY_TEXT)
    assert ids == tokenizer.encode(ANY_TEXT).tolist()
    assert hf_tokenizer.decode(ids) == ANY_TEXT
    # ids that are not whole UTF-8 (a model can generate them) decode with the same replacements
    broken = ids[2:4] + ids[5:9] + [0xFF, 0x41]
    assert hf_tokenizer.decode(broken) == tokenizer.decode(broken)


def test_char_export_refuses_a_character_outside_its_vocabulary_as_ours_does(exported):
    _, tokenizer, out = exported("char")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert "Z" not in tokenizer.chars
    with pytest.raises(Exception, match="UNK"):
        hf_tokenizer.encode("the Zebra")


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_greedy_continuation_equals_our_greedy_generation(exported, kind):
    model, tokenizer, out = exported(kind)
    prompt = "line 12"
    new_tokens = model.config.block_size - len(tokenizer.encode(prompt))
    ours = generate_text(model, tokenizer, prompt, new_tokens, temperature=0)
    generator = transformers.pipeline("text-generation", model=str(out))
    # the bos (a newline, for lm-eval) is a special token, which decoding skips unless told
    theirs = generator(prompt, do_sample=False, skip_special_tokens=False)[0]["generated_text"]
    assert theirs == prompt + ours  # fills the block by default


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_no_input_starts_like_our_empty_prompt(exported, kind):
    model, tokenizer, out = exported(kind)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    sampled = hf_model.generate()  # the export's defaults alone: sample.py's temperature, no top-k
    assert sampled.shape == (1, model.config.block_size)
    greedy = hf_model.generate(do_sample=False)[0].tolist()
    ours = generate_text(model, tokenizer, "", model.config.block_size - 1, temperature=0)
    assert tokenizer.decode(greedy) == "\n" + ours  # sample.py starts an empty prompt at "\n"


def test_generate_on_bare_ids_attends_to_every_token_of_the_prompt(exported):
    """No real id is taken for padding, so a prompt full of newlines passed without an attention
    mask is read whole: the first step's logits are ours."""
    model, tokenizer, out = exported("char")
    ids = torch.tensor([tokenizer.encode("line 3\n\nline 4\n").tolist()])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    output = hf_model.generate(ids, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = model(ids).logits[:, -1]
    assert torch.allclose(output.logits[0], ours, atol=1e-4, rtol=0)


def test_generation_never_draws_a_padded_id_even_when_padded_ids_are_likeliest(exported):
    model, tokenizer, out = exported("bpe")
    assert model.config.vocab_size > tokenizer.vocab_size  # a BPE vocabulary is padded
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)

    def favour_padded_ids(module, inputs, logits):
        logits[..., tokenizer.vocab_size:] += 1000.0
        return logits

    hf_model.lm_head.register_forward_hook(favour_padded_ids)
    torch.manual_seed(0)
    unsuppressed = hf_model.generate(do_sample=False, suppress_tokens=None)[0, 1:]
    assert (unsuppressed >= tokenizer.vocab_size).all()  # the hook works
    drawn = hf_model.generate(num_return_sequences=4)[:, 1:]
    assert (drawn < tokenizer.vocab_size).all()
