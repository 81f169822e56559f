"""The data package's public API: datasets as decoded uint8 arrays, cached on disk, and a batch iterator.

Every dataset is decoded ONCE into equal-size uint8 images (N, H, W, 3) + int64 labels and cached
as .npy (ablations.data.cache); load_dataset picks the source (ablations.data.sources: torchvision
CIFAR, image-folder trees and their archives, synthetic) and takes a seeded stratified subset
(ablations.data.subsets). iterate_batches (ablations.data.batches) slices those arrays, moves each
batch to the device and augments it there (ablations.data.augment); on CUDA a split that fits is
made resident on the GPU once (ablations.data.resident).
"""

from ablations.data import augment
from ablations.data.batches import augmentation_generator, iterate_batches
from ablations.data.cache import default_cache_dir
from ablations.data.dataset import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                    CIFAR_STYLE_MAX_PX, EVAL_MARGIN, DataError, Dataset, Split)
from ablations.data.resident import (WORKERS_PER_DEVICE_ENV, DeviceSplit, clear_device_cache, decide_residency,
                                     device_split, is_resident, release_device_splits, workers_per_device)
from ablations.data.sources import IMAGE_TREES, load_dataset, noise_dataset
from ablations.data.subsets import read_class_list, stratified_indices

__all__ = [
    "Split", "Dataset", "DataError", "DeviceSplit", "load_dataset", "noise_dataset", "iterate_batches",
    "augmentation_generator", "device_split", "is_resident", "clear_device_cache", "workers_per_device",
    "decide_residency", "release_device_splits",
    "default_cache_dir", "read_class_list", "stratified_indices", "augment",
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "CIFAR_STYLE_MAX_PX", "EVAL_MARGIN", "IMAGE_TREES", "WORKERS_PER_DEVICE_ENV",
]
