"""A realistic torch recipe: your own Dataset over sharded files, read by DataLoader workers.

    hvdkit run recipes/digits_files_torch.py -np 2

The data is a shard folder (``hvdkit data shard digits DIR`` writes one; here the bundled digits
are written once to ~/.cache/hvdkit/data). The Dataset below is plain PyTorch: hvdkit hands its
DataLoader this rank's batches of indices, so each rank reads only its own samples.
Reaches val_accuracy >= 0.95 in about 10 s at np=2 on a 2-core CPU (tests/test_example_recipes.py).
"""

from hvdkit.recipe import PythonRecipe


class DigitsFromFiles(PythonRecipe):
    config = {
        "name": "digits-files-torch",
        "framework": "torch",
        "model": {"name": "custom"},
        # 2 DataLoader worker processes, each reading 2 batches ahead of the training step
        "data": {"name": "custom", "workers": 2, "prefetch": 2, "uneven": "pad"},
        "batch_size": 32,
        "epochs": 20,
        "optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01, "clip_norm": 1.0},  # clipped after the allreduce
        "lr_schedule": {"scale": "sqrt", "warmup_epochs": 1, "decay": "cosine"},  # cosine after warm-up
        "label_smoothing": 0.05,
        "precision": "bf16",  # forward passes in bfloat16 autocast, weights and gradients fp32
        "early_stopping": {"metric": "val_accuracy", "patience": 4, "min_delta": 0.001},
    }

    def build_data(self, seed):
        import torch

        from hvdkit.core.data import DataSplits
        from hvdkit.core.files import ShardFolder, digits_shards

        folder = ShardFolder.open(digits_shards(seed=seed))

        class Shards(torch.utils.data.Dataset):
            """Items (x CHW float32, label) of one split; whole shard files are read on demand."""

            def __init__(self, split):
                self.split = split

            def __len__(self):
                return len(self.split)

            def __getitems__(self, indices):  # torch >= 2.2: one read per batch, not per item
                x, y = self.split.take(indices)
                return list(zip(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), y.tolist()))

            def __getitem__(self, i):
                return self.__getitems__([i])[0]

        h, w, c = folder.input_shape
        return DataSplits(Shards(folder.train), Shards(folder.val), num_classes=folder.num_classes, input_shape=(c, h, w))

    def build_model(self, framework, input_shape, num_classes):
        from torch import nn

        c = input_shape[0]
        return nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (input_shape[1] // 2) * (input_shape[2] // 2), 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )
