"""The one task type (:class:`TaskData`), its splits, the offline benchmark sources and one loader per format."""

from mergelab.pools.data.loaders import (
    load_csv_task,
    load_hf_task,
    load_image_folder,
    load_jsonl_task,
    load_task_data,
    load_tensor_file,
    load_user_task,
)
from mergelab.pools.data.sources import SOURCES, TEXT_KIND, check_distinct_inputs, load_source
from mergelab.pools.data.tasks import SPLITS, LazyColumn, TaskData, TextTask, split_task

__all__ = [
    "SOURCES",
    "SPLITS",
    "TEXT_KIND",
    "LazyColumn",
    "TaskData",
    "TextTask",
    "check_distinct_inputs",
    "load_csv_task",
    "load_hf_task",
    "load_image_folder",
    "load_jsonl_task",
    "load_source",
    "load_task_data",
    "load_tensor_file",
    "load_user_task",
    "split_task",
]
