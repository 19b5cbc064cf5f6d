"""Datasets: every dataset becomes train/val/test tensors on the training device, or streams.

- `datasets.py`: the registry `DATASETS` (built-ins, `register_dataset`, `module:function`), the
  built-in loaders, the data folder (`default_data_dir`) and `load_dataset`;
- `tensors.py`: the tensor path: the fixed validation split, normalization, batching by index
  slicing, batched augmentation (`Dataset`, `val_split`, `batch_indices`, `augment_images`);
- `streaming.py`: the seeded streaming path for torch Datasets and data too large for the device
  (`StreamingDataset`), batch for batch the tensor path's order.
"""
from .datasets import (
    BUILTIN_DATASETS, DATASETS, DatasetUnavailable, clear_cache, dataset_loader, default_data_dir, load_dataset,
    register_dataset,
)
from .streaming import DatasetParts, StreamingDataset
from .tensors import RawData, Dataset, VAL_SPLIT_SEED, augment_images, batch_indices, crop_flip, val_split

__all__ = [
    "BUILTIN_DATASETS", "DATASETS", "DatasetUnavailable", "clear_cache", "dataset_loader", "default_data_dir",
    "load_dataset", "register_dataset", "DatasetParts", "StreamingDataset", "RawData", "Dataset", "VAL_SPLIT_SEED",
    "augment_images", "batch_indices", "crop_flip", "val_split",
]
