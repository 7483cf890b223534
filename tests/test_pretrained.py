"""A Hugging Face GPT-2 is a checkpoint: --init_from and --checkpoint take a directory or model id.

Every model here is a tiny random GPT-2 made by `transformers` and saved to a temporary directory
with a tiny BPE tokenizer: no network, no download.
"""

import json
import shutil
import sys

import pytest
import torch

import evaluate
import export
import sample
import train
from gpt_train.checkpoint import load_checkpoint, model_from_checkpoint
from conftest import (TINY_TEXT, assert_same_weights, exit_status, one_error_line, read_checkpoint,
                      tiny_argv, write_corpus)
from gpt_train.tokenizer import BPETokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

VOCAB = 300  # the tokenizer's; the imported model pads it to 320


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """(directory written by save_pretrained with a tokenizer.json, the transformers model)."""
    directory = tmp_path_factory.mktemp("gpt2")
    tokenizer = BPETokenizer.train([TINY_TEXT], VOCAB)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=32,
                                     n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer.tokenizer_json)
    return directory, model


def test_imported_gpt2_gives_transformers_logits_and_loss(gpt2_dir):
    directory, theirs = gpt2_dir
    ours, tokenizer, _ = model_from_checkpoint(directory)
    assert tokenizer.vocab_size == VOCAB and ours.config.vocab_size == 320
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        our_logits = ours(ids).logits
        their_output = theirs(ids, labels=ids)
        our_loss = ours(ids[:, :-1], labels=ids[:, 1:]).loss
    assert torch.allclose(our_logits[..., :VOCAB], their_output.logits, atol=1e-4, rtol=0)
    assert our_loss.item() == pytest.approx(their_output.loss.item(), abs=1e-5)


def test_padded_ids_are_never_scored_nor_sampled_even_with_the_largest_logits(gpt2_dir):
    directory, theirs = gpt2_dir
    ours, tokenizer, _ = model_from_checkpoint(directory)
    padded_rows = ours.token_embedding.weight[VOCAB:]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # padded logits now dwarf the real ones
        padded_rows.copy_(100 * torch.randn(padded_rows.shape, generator=generator))
        ids = torch.randint(0, VOCAB, (2, 32), generator=generator)
        assert (ours(ids).logits.argmax(-1) >= VOCAB).all()
        their_loss = theirs(ids, labels=ids).loss.item()
        for fused in (False, True):  # the plain loss, and the chunked one training and scoring use
            our_loss = ours(ids[:, :-1], labels=ids[:, 1:], return_logits=not fused).loss
            assert our_loss.item() == pytest.approx(their_loss, abs=1e-5), fused
        drawn = ours.generate(ids[:1, :4], 100, vocab_limit=tokenizer.vocab_size,
                              generator=generator)
    assert drawn.max() < VOCAB


def test_vocab_and_merges_files_give_the_same_tokenizer_as_tokenizer_json(gpt2_dir, tmp_path):
    directory, _ = gpt2_dir
    older = tmp_path / "older"
    shutil.copytree(directory, older)
    (older / "tokenizer.json").unlink()
    BPETokenizer((directory / "tokenizer.json").read_text()).backend.model.save(str(older))
    assert {"vocab.json", "merges.txt"} <= {p.name for p in older.iterdir()}
    _, from_json, _ = model_from_checkpoint(directory)
    _, from_files, _ = model_from_checkpoint(older)
    text = TINY_TEXT[:500] + " naïve café ☃\n"
    assert from_files.encode(text).tolist() == from_json.encode(text).tolist()
    assert from_files.decode(from_files.encode(text)) == text


def test_init_from_a_directory_fine_tunes_from_its_evaluated_start_and_lowers_validation_loss(
        gpt2_dir, tmp_path, capsys):
    directory, _ = gpt2_dir
    data = write_corpus(tmp_path)
    run_dir = tmp_path / "tuned"
    train.train(tiny_argv(run_dir, data, init_from=directory, n_layer=2, max_iters=20,
                          warmup_iters=2, learning_rate=1e-2, eval_iter=20, save_iter=20,
                          log_iter=20))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert start["step"] == 0 and end["step"] == 20
    assert end["val_loss"] < start["val_loss"] - 0.5
    output = capsys.readouterr().out
    assert f"initialized from {directory} (a Hugging Face model)" in output
    assert "step 0 (starting model)" in output
    tuned = read_checkpoint(run_dir / "gpt_final.pt")
    assert tuned["tokenizer"] == load_checkpoint(directory)["tokenizer"]
    assert tuned["gpt_config"]["block_size"] == 16  # reduced from the model's 32

    held_out = write_corpus(tmp_path, TINY_TEXT[-2000:], "held_out.txt")

    def loss_on_held_out(checkpoint):
        return evaluate.main(["--checkpoint", str(checkpoint), "--data", str(held_out),
                              "--device", "cpu"])["loss"]

    assert loss_on_held_out(run_dir / "gpt_final.pt") < loss_on_held_out(directory) - 0.5


def test_sample_takes_the_directory_and_its_tokenizer(gpt2_dir, capsys):
    directory, _ = gpt2_dir
    sample.main(["--checkpoint", str(directory), "--prompt", "the quick", "--max_new_tokens", "20",
                 "--device", "cpu"])
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text) > len("the quick\n")


@pytest.fixture(scope="module")
def relu2_untied_run(tmp_path_factory):
    """A tiny byte-level run with GPT-2's other exportable options: ReLU² and an untied head."""
    root = tmp_path_factory.mktemp("relu2-untied")
    train.train(tiny_argv(root / "run", write_corpus(root), tokenizer="byte", mlp="relu2",
                          tie_embeddings="false", max_iters=2, eval_iter=2, save_iter=2))
    return root / "run" / "gpt_final.pt"


@pytest.mark.parametrize("source", ["gpt2", "char run", "byte relu2 untied run"])
def test_export_then_import_then_export_gives_identical_tensors(source, request, tmp_path):
    from safetensors.torch import load_file
    start = {"gpt2": lambda: request.getfixturevalue("gpt2_dir")[0],
             "char run": lambda: request.getfixturevalue("trained_run") / "gpt_final.pt",
             "byte relu2 untied run": lambda: request.getfixturevalue("relu2_untied_run")}[source]()
    first = export.export(start, tmp_path / "first")
    second = export.export(first, tmp_path / "second")  # the export is read back as a checkpoint
    tensors_first = load_file(first / "model.safetensors")
    tensors_second = load_file(second / "model.safetensors")
    assert tensors_first.keys() == tensors_second.keys()
    for name in tensors_first:
        assert torch.equal(tensors_first[name], tensors_second[name]), name
    for name in ("config.json", "tokenizer_vocab.json"):
        assert (first / name).read_text() == (second / name).read_text()


def test_architecture_flags_contradicting_the_pretrained_model_are_one_line(gpt2_dir, tmp_path,
                                                                             capsys):
    directory, _ = gpt2_dir
    argv = tiny_argv(tmp_path / "run", write_corpus(tmp_path), init_from=directory, n_layer=3)
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, "--n_layer 3 contradicts")


def test_a_gpt2_setting_our_model_lacks_is_one_line(gpt2_dir, tmp_path, capsys):
    directory = tmp_path / "relu"
    shutil.copytree(gpt2_dir[0], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    assert exit_status(sample.main, ["--checkpoint", str(directory)]) == 2
    one_error_line(capsys.readouterr().err, "activation_function='relu'")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub with no network and an empty cache of its own: the hub cache directory."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_model_id_without_network_or_cache_is_one_line_suggesting_a_directory(offline_hub,
                                                                                capsys):
    assert exit_status(sample.main, ["--checkpoint", "gpt2"]) == 2
    one_error_line(capsys.readouterr().err, "cannot download gpt2: no network", "save_pretrained")


def test_a_model_id_in_the_hugging_face_cache_loads_without_network(gpt2_dir, offline_hub):
    snapshot = offline_hub / "models--distilgpt2" / "snapshots" / "0123abc"
    shutil.copytree(gpt2_dir[0], snapshot)
    (offline_hub / "models--distilgpt2" / "refs").mkdir()
    (offline_hub / "models--distilgpt2" / "refs" / "main").write_text("0123abc")
    from_cache = load_checkpoint("distilgpt2")
    from_directory = load_checkpoint(gpt2_dir[0])
    assert from_cache["tokenizer"] == from_directory["tokenizer"]
    assert_same_weights(from_cache["model_state_dict"], from_directory["model_state_dict"])


def test_a_model_id_without_huggingface_hub_names_the_package(offline_hub, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    assert exit_status(sample.main, ["--checkpoint", "gpt2-medium"]) == 2
    one_error_line(capsys.readouterr().err, "pip install transformers")
