"""Tasks, their splits, the offline benchmark sources and users' own task files."""

from mergelab.pools.data.sources import SOURCES, TEXT_KIND, check_distinct_inputs, load_source
from mergelab.pools.data.tasks import SPLITS, TextTask, split_task
from mergelab.pools.data.user import load_csv_task, load_hf_task, load_jsonl_task, load_user_task

__all__ = [
    "SOURCES",
    "SPLITS",
    "TEXT_KIND",
    "TextTask",
    "check_distinct_inputs",
    "load_csv_task",
    "load_hf_task",
    "load_jsonl_task",
    "load_source",
    "load_user_task",
    "split_task",
]
