"""Benchmark tasks: read in every format, tokenized and scored as lm-evaluation-harness does, the
same whatever the batching, and every mistake in the input one line.

The reference is independent of our code: the Hugging Face export's own tokenizer and logits,
scored candidate by candidate in a plain loop that follows lm-eval's rules.
"""

import json
import math

import numpy as np
import pytest
import torch

import evaluate
import export
import train
from conftest import exit_status, metrics_records, one_error_line, tiny_argv, tiny_model, \
    write_corpus
from gpt_train.checkpoint import model_from_checkpoint
from gpt_train.generation import encode_prompt
from gpt_train.task_scoring import TaskSuite, load_tasks, score_batch
from gpt_train.tasks import clean_hellaswag_text, encode_pair, hellaswag_prompt, read_task, \
    request_tokens
from gpt_train.tokenizer import CharTokenizer
from model import KVCache

# Items of each format, short enough for a block of 16 tokens, some with a context that is not.
LONG = "line 3: the quick brown fox jumps over the lazy dog 8. line 4: the quick brown fox"
TASKS = {
    "piqa": [{"query": "the quick brown", "choices": ["fox jumps", "dog", "line 4"], "gold": 0},
             {"query": "line 7: the lazy ", "choices": ["dog 10.", "fox", "quick"], "gold": 0},
             {"query": LONG, "choices": ["jumps over", "the dog", "1"], "gold": 0},
             {"query": "", "choices": ["line 1", "quick quick"], "gold": 1}],
    "winogrande": [{"context_options": ["the quick brown fox", "the quick brown dog"],
                    "continuation": "jumps over", "gold": 0},
                   {"context_options": [LONG + " jumps", "line 5: the lazy"],
                    "continuation": "dog 9.", "gold": 1}],
    "lambada_openai": [{"context": "line 12: the quick brown fox jumps over the lazy",
                        "continuation": "dog"},
                       {"context": LONG + " jumps over the", "continuation": "lazy dog"},
                       {"context": "line 2:", "continuation": "the"}],
    "hellaswag": [{"activity_label": "Jumping", "ctx_a": "line 1: the quick brown fox [title]",
                   "ctx_b": "Jumps Over", "endings": ["the lazy dog.", "line [step] 2", "fox"],
                   "label": 0, "ind": 1, "split": "val"}],
}


def write_tasks(directory, tasks=TASKS, nested=True):
    """Each task's items as <task>.jsonl (hellaswag as its release file), in a subdirectory as
    llm-foundry keeps them."""
    for name, items in tasks.items():
        file_name = "hellaswag_val.jsonl" if name == "hellaswag" else f"{name}.jsonl"
        path = directory / ("local_data/some_category" if nested else "") / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny BPE model trained for 10 steps, its export, and the task files."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("tasks")
    data = write_corpus(root)
    train.train(tiny_argv(root / "run", data, tokenizer="bpe", bpe_vocab_size=300, max_iters=10,
                          eval_iter=10, save_iter=10, log_iter=10))
    checkpoint = root / "run" / "gpt_final.pt"
    return checkpoint, export.export(checkpoint, root / "hf"), write_tasks(root / "tasks")


def candidate_log_likelihoods(suite, model, batch_size):
    """Every candidate's summed log-likelihood, in item order, as the suite computes them."""
    batches, count = suite.batches_of(suite.shard(0, 1), batch_size)
    totals = torch.zeros(2, count, dtype=torch.float64)
    for batch in batches:
        score_batch(model, batch, totals)
    return totals[0].numpy()


def reference_log_likelihood(hf_tokenizer, hf_model, context, continuation, vocab):
    """(log-likelihood, whether greedy decoding gives the continuation): lm-eval's recipe,
    written out plainly over the Hugging Face export."""
    if not context:
        ids = hf_tokenizer.encode(continuation, add_special_tokens=False)
        context_ids, continuation_ids = ([hf_tokenizer.bos_token_id], ids) \
            if ids[0] != hf_tokenizer.bos_token_id else (ids[:1], ids[1:])
    else:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = hf_tokenizer.encode(context + continuation)
        context_ids = hf_tokenizer.encode(context)
        continuation_ids = whole[len(context_ids):]
    window = (context_ids + continuation_ids)[-(hf_model.config.n_positions + 1):]
    with torch.no_grad():
        logits = hf_model(torch.tensor([window[:-1]])).logits[0, :, :vocab]
    scored = torch.log_softmax(logits.double(), -1)[-len(continuation_ids):]
    greedy = scored.argmax(-1).tolist() == continuation_ids
    return scored[torch.arange(len(continuation_ids)), continuation_ids].sum().item(), greedy


@pytest.mark.slow
def test_log_likelihoods_and_choices_equal_a_plain_loop_over_the_hugging_face_export(bpe_run):
    transformers = pytest.importorskip("transformers")
    checkpoint, out, tasks_dir = bpe_run
    model, tokenizer, _ = model_from_checkpoint(checkpoint)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    suite = load_tasks(",".join(TASKS), tasks_dir, tokenizer, model.config.block_size)
    ours = candidate_log_likelihoods(suite, model, 4 * model.config.block_size)
    results = suite.score(model, 4)
    first = 0
    for task in suite.tasks:
        for index, item in enumerate(task.items):
            reference, greedy = zip(*[
                reference_log_likelihood(hf_tokenizer, hf_model, context, continuation,
                                         tokenizer.vocab_size)
                for context, continuation in zip(item.contexts, item.continuations)])
            mine = ours[first:first + len(reference)]
            first += len(reference)
            assert mine == pytest.approx(reference, abs=1e-4), (task.name, index)
            if task.kind == "language_modelling":
                assert results[task.name]["per_item"]["acc"][index] == int(greedy[0])
            else:
                verdict = int(np.argmax(reference) == item.gold)
                assert results[task.name]["per_item"]["acc"][index] == verdict
            if task.has_acc_norm:
                normalized = np.array(reference) / np.array(item.choice_lengths)
                assert results[task.name]["per_item"]["acc_norm"][index] == \
                    int(np.argmax(normalized) == item.gold)
    lambada = TASKS["lambada_openai"]
    perplexity = math.exp(-np.mean([reference_log_likelihood(
        hf_tokenizer, hf_model, item["context"], " " + item["continuation"],
        tokenizer.vocab_size)[0] for item in lambada]))
    assert results["lambada_openai"]["perplexity"] == pytest.approx(perplexity, rel=1e-4)


def test_the_figures_do_not_depend_on_how_candidates_are_batched(bpe_run):
    checkpoint, _, tasks_dir = bpe_run
    model, tokenizer, _ = model_from_checkpoint(checkpoint)
    suite = load_tasks(",".join(TASKS), tasks_dir, tokenizer, model.config.block_size)
    one_at_a_time = candidate_log_likelihoods(suite, model, model.config.block_size)
    many = candidate_log_likelihoods(suite, model, 64 * model.config.block_size)
    assert np.allclose(one_at_a_time, many, atol=1e-5)
    assert suite.score(model, 1) == suite.score(model, 64)


def test_several_new_positions_on_a_cache_attend_causally_as_a_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, "cpu", torch.float32)
        parts = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:], cache=cache).logits]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_lm_evals_pairing_of_context_and_continuation():
    def encode(text):
        return [ord(character) for character in text]

    # whitespace ending the context goes to the continuation; the pair is encoded whole
    assert encode_pair(encode, "ab  ", "c", 0) == ([97, 98], [32, 32, 99])
    assert encode_pair(encode, "", " c", 7) == ([7], [32, 99])  # the start id before nothing
    assert encode_pair(encode, "", "\nc", 10) == ([10], [99])  # unless the text starts with it
    # the oldest ids go first; the last input predicts the continuation's last id
    assert request_tokens([1, 2, 3, 4, 5], [6, 7], 4) == ([3, 4, 5, 6], 3)


def test_hellaswag_release_items_are_prompted_as_lm_eval_prompts_them():
    record = {"activity_label": "Home and Garden", "ctx_a": "[header] How to plant roses "
              "[title] Pick a spot.", "ctx_b": "Then The roses", "endings": [
                  "grow  tall. [step] Water   them.", " [title] Done "], "label": "1"}
    query, endings = hellaswag_prompt(record)
    # the ends stripped first, then " [title]" -> ". ", other tags dropped, "  " -> " " once over
    assert query == "Home and Garden: How to plant roses. Pick a spot. Then the roses"
    assert endings == ["grow tall. Water  them.", " Done"]
    assert clean_hellaswag_text("a [x] b [title]") == "a b. "


def test_each_format_is_read_into_candidates(tmp_path):
    write_tasks(tmp_path)
    piqa = read_task("piqa", tmp_path, limit=2)
    assert [len(piqa.items), piqa.kind, piqa.items[0].continuations[1]] == \
        [2, "multiple_choice", " dog"]
    assert piqa.items[1].choice_lengths == [7, 3, 5]
    winogrande = read_task("winogrande", tmp_path)
    assert winogrande.items[0].contexts[1] == "the quick brown dog"
    assert winogrande.items[0].continuations == [" jumps over"] * 2
    assert not winogrande.has_acc_norm
    hellaswag = read_task("hellaswag", tmp_path)  # found as hellaswag_val.jsonl
    assert hellaswag.path.name == "hellaswag_val.jsonl" and hellaswag.has_acc_norm


def test_a_char_level_model_leaves_out_items_with_characters_it_never_saw(tmp_path):
    tokenizer = CharTokenizer("abc d")
    write_tasks(tmp_path, {"copa": [{"query": "ab", "choices": ["c", "d"], "gold": 0},
                                    {"query": "xyz", "choices": ["c", "d"], "gold": 0}]})
    suite = load_tasks("copa", tmp_path, tokenizer, 16)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    results = suite.score(model, 4)["copa"]
    assert (results["items"], results["left_out"], results["baseline"]) == (1, 1, 0.5)


@pytest.mark.parametrize("lines, named", [
    (['{"query": "a", "choices": ["b"], "gold": 0}', "{not json"], ":2: not a JSON object"),
    (['{"query": "a", "choices": ["b"], "gold": 3}'], ":1: a malformed multiple choice item"),
    (['{"question": "a"}'], ":1: keys ['question'] match no task format"),
    (['{"query": "a", "choices": ["b"], "gold": 0}', '{"context": "a", "continuation": "b"}'],
     ":2: a language modelling item in a file of multiple choice items"),
    (['{"query": "a", "choices": ["' + "b" * 40 + '"], "gold": 0}'],
     ":1: a candidate of 41 tokens, longer on its own than the model's block_size 16"),
])
def test_a_bad_task_file_is_one_line_naming_the_file_and_line(trained_run, tmp_path, capsys,
                                                              lines, named):
    (tmp_path / "copa.jsonl").write_text("\n".join(lines) + "\n")
    status = exit_status(evaluate.main, ["--checkpoint_dir", str(trained_run), "--tasks", "copa",
                                         "--tasks_dir", str(tmp_path)])
    assert status == 2
    one_error_line(capsys.readouterr().err, str(tmp_path / "copa.jsonl") + named)


@pytest.mark.parametrize("flags, named", [
    (["--tasks", "piqa,mmlu", "--tasks_dir", "DIR"], "unknown task mmlu: no mmlu.jsonl under"),
    (["--tasks", "piqa"], "--tasks needs --tasks_dir"),
    (["--tasks", "piqa", "--tasks_dir", "DIR", "--data", "x.txt"],
     "--tasks scores benchmark tasks, not a text"),
    (["--limit", "3"], "--limit goes with --tasks"),
])
def test_task_flags_that_cannot_work_are_one_line(trained_run, tmp_path, capsys, flags, named):
    write_tasks(tmp_path, {"piqa": TASKS["piqa"], "copa": TASKS["piqa"]})
    argv = ["--checkpoint_dir", str(trained_run)] + \
        [str(tmp_path) if flag == "DIR" else flag for flag in flags]
    assert exit_status(evaluate.main, argv) == 2
    error = one_error_line(capsys.readouterr().err, named)
    if "unknown" in named:
        assert "found: copa, piqa" in error


def test_evaluate_prints_the_table_and_writes_results_it_may_replace(bpe_run, tmp_path, capsys):
    checkpoint, _, tasks_dir = bpe_run
    results = tmp_path / "results.json"
    argv = ["--checkpoint", str(checkpoint), "--tasks", "piqa,lambada_openai", "--tasks_dir",
            str(tasks_dir), "--limit", "2", "--results", str(results)]
    assert exit_status(evaluate.main, argv) == 0
    table = capsys.readouterr().out
    assert "centered accuracy" in table and "perplexity" in table
    written = json.loads(results.read_text())
    assert written["tasks"]["piqa"]["items"] == 2 and "acc_norm" in written["tasks"]["piqa"]
    assert "acc_norm" not in written["tasks"]["lambada_openai"]
    assert exit_status(evaluate.main, argv) == 0  # its own earlier results: replaced
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert exit_status(evaluate.main, argv[:-1] + [str(notes)]) == 2
    assert notes.read_text() == '{"mine": 1}'


def test_training_logs_the_tasks_at_every_evaluation(tmp_path):
    write_tasks(tmp_path / "tasks")
    data = write_corpus(tmp_path)
    train.train(tiny_argv(tmp_path / "run", data, tokenizer="byte", max_iters=4, eval_iter=2,
                          save_iter=4, eval_tasks="piqa,winogrande", tasks_dir=tmp_path / "tasks",
                          eval_tasks_limit=2))
    evaluations = [r for r in metrics_records(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        assert {"piqa/acc", "piqa/acc_norm", "winogrande/acc",
                "tasks/centered_accuracy"} <= record.keys()
    import plot
    assert set(plot.read_metrics(tmp_path / "run" / "metrics.jsonl")["tasks"]) == \
        {"piqa/acc_norm", "winogrande/acc", "tasks/centered_accuracy"}


def test_the_export_names_the_id_sample_py_starts_from_as_its_bos(bpe_run):
    transformers = pytest.importorskip("transformers")
    checkpoint, out, _ = bpe_run
    _, tokenizer, _ = model_from_checkpoint(checkpoint)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.bos_token_id == int(encode_prompt(tokenizer, "", "cpu")[0, 0])
    assert hf_tokenizer.decode([hf_tokenizer.bos_token_id]) == "\n"
    assert hf_tokenizer.eos_token_id is None  # generation still stops only at max_length
    assert hf_tokenizer.encode("a\nb") == tokenizer.encode("a\nb").tolist()  # nothing added


def test_the_lm_eval_tasks_of_the_benchmark_read_the_files_evaluate_finds(tmp_path):
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare_lm_eval import write_task_yamls
    from gpt_train.tasks import find_task_file
    write_tasks(tmp_path / "tasks")
    write_task_yamls(list(TASKS), tmp_path / "tasks", tmp_path / "yaml")
    for name in TASKS:
        text = (tmp_path / "yaml" / f"{name}_jsonl.yaml").read_text()
        found = find_task_file(name, tmp_path / "tasks").resolve()
        assert f"    test: {json.dumps(str(found))}\n" in text
    assert (tmp_path / "yaml" / "hellaswag_docs.py").is_file()
