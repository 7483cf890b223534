"""lm-evaluation-harness's own HellaSwag prompt (its `hellaswag` task), for hellaswag_jsonl.yaml."""

from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401
