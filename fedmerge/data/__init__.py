"""Data: named datasets as in-memory ``LabeledImages`` and client partitioners."""

from fedmerge.data.datasets import (
    DATASET_NAMES,
    NORMALIZATION,
    CorruptDatasetError,
    DatasetNotFoundError,
    cache_dir,
    canonical_name,
    clear_cache,
    data_root,
    data_search_dirs,
    load_dataset,
    rotate_images,
)
from fedmerge.data.images import LabeledImages, concat
from fedmerge.data.partition import (
    PARTITION_KINDS,
    dirichlet_partition,
    disjoint_label_classes,
    disjoint_label_partition,
    domain_split,
    iid_partition,
    make_partition,
    partition_summary,
)

__all__ = [
    "DATASET_NAMES",
    "NORMALIZATION",
    "PARTITION_KINDS",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "LabeledImages",
    "cache_dir",
    "canonical_name",
    "clear_cache",
    "concat",
    "data_root",
    "data_search_dirs",
    "dirichlet_partition",
    "disjoint_label_classes",
    "disjoint_label_partition",
    "domain_split",
    "iid_partition",
    "load_dataset",
    "make_partition",
    "partition_summary",
    "rotate_images",
]
