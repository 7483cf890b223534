"""export.py: a checkpoint becomes a Hugging Face GPT-2 directory that computes the same logits,
written only where no user file would be lost. (Its tokenizer and generation in transformers:
test_export_pipeline.py.)"""

import json
import os
import stat
import sys

import pytest
import torch

import export
import train
from gpt_train.checkpoint import model_from_checkpoint
from gpt_train.export_directory import EXPORT_FILES
from conftest import exit_status, snapshot, tiny_argv, write_corpus
from gpt_train.tokenizer import tokenizer_from_state

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def bpe_run_without_bias(tmp_path_factory):
    """A tiny BPE run with --bias false: its vocabulary is padded beyond the tokenizer's."""
    root = tmp_path_factory.mktemp("bpe-no-bias")
    data = write_corpus(root)
    checkpoint_dir = root / "checkpoints"
    train.train(tiny_argv(checkpoint_dir, data, tokenizer="bpe", bpe_vocab_size=300, bias="false",
                          max_iters=4, save_iter=2, eval_iter=4))
    return checkpoint_dir


def logits_of_both(checkpoint_path, out_dir):
    """Our logits and the exported model's, float32 on the CPU, on two windows of random ids."""
    export.main(["--checkpoint", str(checkpoint_path), "--out", str(out_dir)])
    ours, tokenizer, _ = model_from_checkpoint(checkpoint_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tokenizer.vocab_size, (2, ours.config.block_size), generator=generator)
    with torch.no_grad():
        return ours(ids).logits, theirs(ids).logits


@pytest.mark.parametrize("name", ["gpt_final.pt", "gpt_step4.pt"])
def test_exported_model_with_biases_gives_our_logits(trained_run, tmp_path, name):
    ours, theirs = logits_of_both(trained_run / name, tmp_path / "hf")
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)


def test_exported_model_without_biases_gives_our_logits(bpe_run_without_bias, tmp_path):
    checkpoint = torch.load(bpe_run_without_bias / "gpt_final.pt", weights_only=True)
    assert not any(name.endswith(".bias") for name in checkpoint["model_state_dict"])
    ours, theirs = logits_of_both(bpe_run_without_bias / "gpt_final.pt", tmp_path / "hf")
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)


def test_config_declares_our_architecture_and_the_padded_vocabulary(bpe_run_without_bias, tmp_path):
    export.export(bpe_run_without_bias / "gpt_final.pt", tmp_path)
    model, tokenizer, _ = model_from_checkpoint(bpe_run_without_bias / "gpt_final.pt")
    config = transformers.GPT2Config.from_pretrained(tmp_path)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > tokenizer.vocab_size
    assert config.vocab_size == model.config.vocab_size
    assert (config.n_positions, config.n_embd, config.n_layer, config.n_head) == (
        model.config.block_size, model.config.n_embd, model.config.n_layer, model.config.n_head)
    # the activation Hugging Face builds from this name is torch's tanh GELU, bit for bit
    activation = transformers.activations.ACT2FN[config.activation_function]
    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(activation(x), torch.nn.GELU(approximate="tanh")(x))
    assert config.tie_word_embeddings
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0


@pytest.mark.parametrize("run", ["trained_run", "bpe_run_without_bias"])
def test_tokenizer_vocab_json_decodes_ids_without_this_project(run, request, tmp_path):
    checkpoint_path = request.getfixturevalue(run) / "gpt_final.pt"
    export.main(["--checkpoint", str(checkpoint_path), "--out", str(tmp_path)])
    _, tokenizer, _ = model_from_checkpoint(checkpoint_path)
    vocabulary = json.loads((tmp_path / "tokenizer_vocab.json").read_text())
    assert vocabulary["kind"] == tokenizer.kind
    assert vocabulary["vocab_size"] == len(vocabulary["pieces"]) == tokenizer.vocab_size
    text = "the lazy dog 7.\n"
    ids = tokenizer.encode(text)
    decoded = b"".join(bytes.fromhex(vocabulary["pieces"][i]) for i in ids).decode("utf-8")
    assert decoded == text
    rebuilt = tokenizer_from_state(vocabulary["tokenizer_state"])
    assert rebuilt.encode(text).tolist() == ids.tolist()


def test_export_without_safetensors_says_which_package_to_install(trained_run, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "hf"
    status = exit_status(export.main, ["--checkpoint", str(trained_run / "gpt_final.pt"),
                                       "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(error) == 1 and "pip install safetensors" in error[0]
    assert not out.exists()


def test_export_of_a_missing_checkpoint_is_one_line_and_status_2(tmp_path, capsys):
    status = exit_status(export.main, ["--checkpoint", str(tmp_path / "nope.pt"),
                                       "--out", str(tmp_path / "hf")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(error) == 1 and "checkpoint not found" in error[0]


def export_status(checkpoint_path, *flags):
    return exit_status(export.main, ["--checkpoint", str(checkpoint_path), *map(str, flags)])


def test_export_into_a_users_non_empty_directory_is_refused_and_changes_nothing(trained_run,
                                                                               tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own config"}')
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    status = export_status(trained_run / "gpt_final.pt", "--out", out)
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(error) == 1 and "--overwrite true" in error[0] and str(out) in error[0]
    assert snapshot(out) == before


def test_overwrite_true_replaces_files_of_the_same_names_and_keeps_the_rest(trained_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own config"}')
    (out / "notes.txt").write_text("keep me")
    assert export_status(trained_run / "gpt_final.pt", "--out", out, "--overwrite", "true") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_exporting_again_into_an_earlier_export_replaces_it(trained_run, tmp_path):
    out = tmp_path / "hf"
    assert export_status(trained_run / "gpt_step4.pt", "--out", out) == 0
    step4 = snapshot(out)
    assert export_status(trained_run / "gpt_final.pt", "--out", out) == 0
    assert snapshot(out).keys() == step4.keys()
    assert snapshot(out)["model.safetensors"] != step4["model.safetensors"]


@pytest.mark.parametrize("flag", ["--out", "--checkpoint_dir"])
def test_an_empty_directory_name_is_an_error_not_the_current_directory(trained_run, tmp_path,
                                                                      monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint_dir", str(trained_run), "--out", str(tmp_path / "hf"), flag, ""]
    status = exit_status(export.main, argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(error) == 1 and flag in error[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_an_export_gets_the_users_umask(trained_run, tmp_path, umask):
    previous = os.umask(umask)
    try:
        export.main(["--checkpoint", str(trained_run / "gpt_final.pt"),
                     "--out", str(tmp_path / "hf")])
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "hf").iterdir()}
    assert set(modes) == set(EXPORT_FILES)
    assert set(modes.values()) == {0o666 & ~umask}, {name: oct(m) for name, m in modes.items()}
