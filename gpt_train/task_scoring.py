"""Scoring benchmark tasks: the candidates' log-likelihoods, batched, and the accuracies.

What an item is and how its text becomes token requests is tasks.py's job; this module runs the
requests through the model and turns them into figures. Notable details:
- candidates of many items go through the model in one forward pass, items of similar lengths
  together, up to a budget of tokens per pass (`plan_batches`);
- the context an item's candidates share is computed once: a first pass over the shared prefix
  fills a key/value cache (`SharedPrefixCache`), whose rows are repeated for each candidate of
  the item, and a second pass runs only what differs (the last context id and the candidate);
- log-probabilities are taken over the tokenizer's ids only (not a BPE vocabulary's padding);
  per candidate the summed log-likelihood and whether greedy decoding gives each of its ids are
  summed on the device and read once, at the end;
- `acc` picks the candidate of highest log-likelihood, `acc_norm` divides it by the choice's
  length in characters (multiple choice only), a language-modelling item is right when greedy
  decoding gives its whole continuation; `perplexity` is e^-(mean log-likelihood of an item's
  continuation) (all as lm-evaluation-harness defines them);
- the summary centers each task's accuracy on its random baseline (1 / the number of
  candidates, 0 for language modelling), (acc - baseline) / (1 - baseline), and averages them,
  as nanochat's CORE metric does; the accuracy is acc_norm where a task has one, else acc;
- under torchrun every rank scores its share of the items and one all-reduce sums the counts;
  with `lockstep` (FSDP, where every forward pass is collective) ranks with fewer passes make
  empty ones.
"""

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_train.generation import encode_prompt
from gpt_train.progress import progress as show_progress
from gpt_train.tasks import encode_task, parse_task_names, read_task

SUMS = ("acc", "acc_norm", "items", "log_likelihood")  # per task, summed over ranks
LOGITS_BYTES = 1 << 30  # at most this much float32 logits per forward pass


class SharedPrefixCache:
    """Keys and values of shared prefixes (one row per item), read by the candidates' pass with
    each row repeated for the candidates that continue it. model.py's attention calls `append`
    and the model advances `length`, as with its own KVCache."""

    def __init__(self):
        self.keys, self.values, self.length, self.rows = {}, {}, 0, None

    def repeat_rows(self, rows):
        """From now on row i of the batch continues prefix rows[i]."""
        self.keys = {layer: keys[rows] for layer, keys in self.keys.items()}
        self.values = {layer: values[rows] for layer, values in self.values.items()}

    def append(self, layer, keys, values):
        if layer in self.keys:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        else:
            self.keys[layer], self.values[layer] = keys, values
        return keys, values


@dataclass
class Batch:
    """One forward pass (two with a shared prefix): candidates' input ids and what they score."""

    prefix: np.ndarray | None  # (items, shared) ids, or None when nothing is shared
    prefix_rows: np.ndarray | None  # per candidate row, its item's prefix row
    inputs: np.ndarray  # (candidates, longest - shared) ids after the prefix, 0-padded
    rows: np.ndarray  # per scored id: its row, position and id, and its candidate's index
    positions: np.ndarray
    targets: np.ndarray
    candidates: np.ndarray
    items: int


def shared_length(item):
    """The ids every candidate of the item starts with, short of the last context id (which must
    run with the candidate, to predict its first id); 0 for a single candidate."""
    if len(item.inputs) < 2:
        return 0
    limit = min(item.context_lengths) - 1
    first = item.inputs[0]
    for other in item.inputs[1:]:
        same = 0
        while same < min(limit, len(other)) and other[same] == first[same]:
            same += 1
        limit = same
    return limit


def plan_batches(items, first_candidates, token_budget):
    """Batches of whole items, longest shared prefix first, each at most `token_budget` ids per
    pass. `first_candidates[i]` is the index of item i's first candidate in the results."""
    order = sorted(range(len(items)), key=lambda i: (-shared_length(items[i]),
                                                     -max(map(len, items[i].inputs))))
    batches, chosen, shared, longest, rows = [], [], 0, 0, 0
    for index in order:
        item = items[index]
        new_shared = min(shared, shared_length(item)) if chosen else shared_length(item)
        new_longest = max(longest, max(map(len, item.inputs)))
        new_rows = rows + len(item.inputs)
        cost = max((len(chosen) + 1) * new_shared, new_rows * (new_longest - new_shared))
        if chosen and cost > token_budget:
            batches.append(make_batch([items[i] for i in chosen],
                                      [first_candidates[i] for i in chosen], shared))
            chosen, new_shared, new_longest, new_rows = [], shared_length(item), \
                max(map(len, item.inputs)), len(item.inputs)
        chosen.append(index)
        shared, longest, rows = new_shared, new_longest, new_rows
    if chosen:
        batches.append(make_batch([items[i] for i in chosen],
                                  [first_candidates[i] for i in chosen], shared))
    return batches


def make_batch(items, first_candidates, shared):
    """The arrays of one batch (see Batch); all its items share their first `shared` ids."""
    width = max(len(ids) for item in items for ids in item.inputs) - shared
    count = sum(len(item.inputs) for item in items)
    inputs = np.zeros((count, width), dtype=np.int64)
    prefix = np.array([item.inputs[0][:shared] for item in items], dtype=np.int64) \
        if shared else None
    prefix_rows, rows, positions, targets, candidates = [], [], [], [], []
    row = 0
    for item_row, (item, first) in enumerate(zip(items, first_candidates)):
        for offset, (ids, continuation) in enumerate(zip(item.inputs, item.continuations)):
            inputs[row, :len(ids) - shared] = ids[shared:]
            start = len(ids) - len(continuation) - shared  # predicts the continuation's first id
            rows.append(np.full(len(continuation), row))
            positions.append(np.arange(start, start + len(continuation)))
            targets.append(continuation)
            candidates.append(np.full(len(continuation), first + offset))
            prefix_rows.append(item_row)
            row += 1
    joined = [np.concatenate(parts).astype(np.int64)
              for parts in (rows, positions, targets, candidates)]
    return Batch(prefix, np.array(prefix_rows) if shared else None, inputs, *joined,
                 items=len(items))


@torch.no_grad()
def score_batch(model, batch, totals, autocast=contextlib.nullcontext):
    """Add each scored candidate's log-likelihood to totals[0] and its ids that greedy decoding
    does not give to totals[1], on the device."""
    device = totals.device
    cache = None
    with autocast():
        if batch.prefix is not None:
            cache = SharedPrefixCache()
            model(torch.from_numpy(batch.prefix).to(device), cache=cache)
            cache.repeat_rows(torch.from_numpy(batch.prefix_rows).to(device))
        logits = model(torch.from_numpy(batch.inputs).to(device), cache=cache).logits
    rows, positions, targets, candidates = (torch.from_numpy(array).to(device) for array in
                                            (batch.rows, batch.positions, batch.targets,
                                             batch.candidates))
    chosen = logits[rows, positions, :model.vocab_limit].float()
    log_probabilities = F.log_softmax(chosen, dim=-1)
    scores = log_probabilities.gather(1, targets[:, None])[:, 0]
    missed = log_probabilities.argmax(dim=-1) != targets
    totals[0].index_add_(0, candidates, scores.double())
    totals[1].index_add_(0, candidates, missed.double())


def token_budget(model, batch_size):
    """Ids per forward pass: batch_size windows of the block, or fewer where the float32 logits
    would pass LOGITS_BYTES."""
    return max(model.config.block_size,
               min(batch_size * model.config.block_size,
                   LOGITS_BYTES // (4 * model.config.vocab_size)))


def load_tasks(names, tasks_dir, tokenizer, block_size, limit=0):
    """The TaskSuite of comma-separated task `names`, read from `tasks_dir`."""
    tasks = [read_task(name, tasks_dir, limit) for name in parse_task_names(names)]
    start = int(encode_prompt(tokenizer, "", "cpu")[0, 0])  # the export's bos: lm-eval's too
    return TaskSuite(tasks, tokenizer, block_size, start)


class TaskSuite:
    """Tasks read and tokenized once, then scored as often as asked (every evaluation of a
    training run, or once by evaluate.py)."""

    def __init__(self, tasks, tokenizer, block_size, start_id):
        self.tasks = tasks
        self.encoded, self.kept = [], []
        for task in tasks:
            encoded, kept = encode_task(task, tokenizer, block_size, start_id)
            self.encoded.append(encoded)
            self.kept.append(kept)
        self.baselines = [self.baseline(task, kept) for task, kept in zip(tasks, self.kept)]

    @staticmethod
    def baseline(task, kept):
        """The accuracy of a random guess: the mean of 1 / candidates (0 for language modelling)."""
        if task.kind == "language_modelling" or not kept:
            return 0.0
        return float(np.mean([1 / len(task.items[i].contexts) for i in kept]))

    def left_out(self, index):
        return len(self.tasks[index].items) - len(self.kept[index])

    def shard(self, rank, world_size):
        """(task index, item index) of this rank's items: every world_size-th of all tasks'."""
        pairs = [(t, i) for t, encoded in enumerate(self.encoded) for i in range(len(encoded))]
        return pairs[rank::world_size]

    def score(self, model, batch_size, autocast=contextlib.nullcontext, rank=0, world_size=1,
              lockstep=False, progress=False):
        """{task name: {"items", "acc", "acc_norm" (multiple choice), "perplexity" (language
        modelling), "left_out", "baseline", and in one process "per_item": each item's line in
        its file and whether acc and acc_norm count it right}} over every rank's items; `model`
        in eval mode."""
        device = next(model.parameters()).device
        budget = token_budget(model, batch_size)
        mine = self.shard(rank, world_size)
        batches, candidates = self.batches_of(mine, budget)
        totals = torch.zeros(2, max(candidates, 1), dtype=torch.float64, device=device)
        shown = show_progress(batches, len(mine), "scoring tasks", "items",
                              size=lambda batch: batch.items) if progress else batches
        for batch in shown:  # a bar on a terminal, lines in a log file (progress.py)
            score_batch(model, batch, totals, autocast)
        if lockstep:
            self.match_forward_passes(model, batches, world_size, budget, autocast)
        outcomes = list(self.outcomes(mine, totals))
        sums = self.task_sums(outcomes, device)
        if world_size > 1:
            dist.all_reduce(sums)
        results = self.results(sums.tolist())
        if world_size == 1:
            for index, task in enumerate(self.tasks):
                results[task.name]["per_item"] = per_item_verdicts(
                    [outcome for outcome in outcomes if outcome[0] == index])
        return results

    @torch.no_grad()
    def match_forward_passes(self, model, batches, world_size, budget, autocast):
        """As many forward passes as the rank with the most (under FSDP each pass gathers the
        weights from every rank): the missing ones on a single id, their output unused."""
        device = next(model.parameters()).device
        passes = max(self.forward_passes(rank, world_size, budget) for rank in range(world_size))
        for _ in range(passes - sum(1 + (batch.prefix is not None) for batch in batches)):
            with autocast():
                model(torch.zeros(1, 1, dtype=torch.long, device=device))

    def batches_of(self, pairs, budget):
        """The batches of these (task, item) pairs and the number of their candidates."""
        items, firsts, count = [], [], 0
        for task, index in pairs:
            item = self.encoded[task][index]
            items.append(item)
            firsts.append(count)
            count += len(item.inputs)
        return plan_batches(items, firsts, budget), count

    def forward_passes(self, rank, world_size, budget):
        batches, _ = self.batches_of(self.shard(rank, world_size), budget)
        return sum(1 + (batch.prefix is not None) for batch in batches)

    def outcomes(self, pairs, totals):
        """Per item of `pairs`: (task index, item, acc, acc_norm, the right candidate's
        log-likelihood), from the candidates' totals."""
        log_likelihoods, missed = (values.tolist() for values in totals)
        first = 0
        for task_index, index in pairs:
            task = self.tasks[task_index]
            item = task.items[self.kept[task_index][index]]
            scores = np.array(log_likelihoods[first:first + len(item.contexts)])
            if task.kind == "language_modelling":
                right = right_norm = missed[first] == 0
            else:
                right = int(np.argmax(scores)) == item.gold  # the first of equal scores
                right_norm = task.has_acc_norm and \
                    int(np.argmax(scores / np.array(item.choice_lengths))) == item.gold
            yield task_index, item, bool(right), bool(right_norm), scores[item.gold]
            first += len(item.contexts)

    def task_sums(self, outcomes, device):
        """Per task the SUMS of its items' outcomes, as a (tasks, 4) float64 tensor."""
        sums = np.zeros((len(self.tasks), len(SUMS)))
        for task_index, _, right, right_norm, log_likelihood in outcomes:
            sums[task_index] += (right, right_norm, 1, log_likelihood)
        return torch.tensor(sums, dtype=torch.float64, device=device)

    def results(self, sums):
        results = {}
        for index, (task, (acc, acc_norm, items, log_likelihood)) in \
                enumerate(zip(self.tasks, sums)):
            result = {"items": int(items), "acc": acc / max(items, 1)}
            if task.has_acc_norm:
                result["acc_norm"] = acc_norm / max(items, 1)
            if task.kind == "language_modelling":
                mean = log_likelihood / max(items, 1)
                result["perplexity"] = math.exp(-mean) if -mean < 700 else math.inf
            result.update(left_out=self.left_out(index), baseline=self.baselines[index])
            results[task.name] = result
        return results


def per_item_verdicts(outcomes):
    """Each item's line in its file and whether acc and acc_norm count it right (0 or 1)."""
    return {"line": [item.line for _, item, *_ in outcomes],
            "acc": [int(right) for _, _, right, _, _ in outcomes],
            "acc_norm": [int(right_norm) for _, _, _, right_norm, _ in outcomes]}


def summary_accuracy(result):
    """The accuracy a task counts with in the summary: acc_norm where it has one, else acc."""
    return result.get("acc_norm", result["acc"])


def centered_accuracy(results):
    """The mean over tasks of (accuracy - baseline) / (1 - baseline)."""
    centered = [(summary_accuracy(r) - r["baseline"]) / (1 - r["baseline"])
                for r in results.values() if r["items"]]
    return float(np.mean(centered)) if centered else math.nan


def format_table(results):
    """The table evaluate.py prints: a row per task and the summary row."""
    lines = [f"{'task':<24} {'items':>7} {'acc':>8} {'acc_norm':>9} {'baseline':>9}  other"]
    for name, r in results.items():
        acc_norm = f"{100 * r['acc_norm']:8.2f}%" if "acc_norm" in r else f"{'-':>9}"
        other = [f"perplexity {r['perplexity']:.2f}"] if "perplexity" in r else []
        if r["left_out"]:
            other.append(f"{r['left_out']} left out (characters the vocabulary lacks)")
        lines.append(f"{name:<24} {r['items']:>7} {100 * r['acc']:7.2f}% {acc_norm} "
                     f"{100 * r['baseline']:8.2f}%  {'; '.join(other)}".rstrip())
    lines.append(f"{'centered accuracy':<24} {'':>7} {centered_accuracy(results):8.4f}  "
                 f"(mean of (accuracy - baseline) / (1 - baseline); accuracy = acc_norm where "
                 f"shown, else acc)")
    return "\n".join(lines)


def metrics_record(results):
    """The metrics of an evaluation during training: `hellaswag/acc_norm` and the like."""
    record = {}
    for name, r in results.items():
        for key in ("acc", "acc_norm", "perplexity"):
            if key in r:
                record[f"{name}/{key}"] = r[key]
    record["tasks/centered_accuracy"] = centered_accuracy(results)
    return record


# ------------------------------------------------------------------------- during training

def training_tasks(train_config, tokenizer, block_size):
    """--eval_tasks read and tokenized once for a training run; None without them."""
    t = train_config
    if not t.eval_tasks:
        return None
    return load_tasks(t.eval_tasks, t.tasks_dir, tokenizer, block_size, t.eval_tasks_limit)


def task_metrics(run):
    """At an evaluation of a training run: its --eval_tasks' figures as metrics (see
    `metrics_record`), each rank scoring its share; {} without --eval_tasks."""
    if run.tasks is None:
        return {}
    was_training = run.model.training
    run.model.eval()
    results = run.tasks.score(run.model, run.train_config.batch_size, run.runtime.autocast,
                              run.runtime.rank, run.runtime.world_size,
                              lockstep=run.parallel.every_rank_runs_forward)
    run.model.train(was_training)
    return metrics_record(results)
