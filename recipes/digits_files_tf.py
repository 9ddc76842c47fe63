"""A realistic TensorFlow recipe: a tf.data pipeline over sharded files.

    hvdkit run recipes/digits_files_tf.py -np 2

The pipeline yields row ids; ``decode`` reads a row from the shard files. hvdkit shuffles the ids
with the shared seed, shards them per rank, and only then maps ``decode`` (in parallel), so each
rank reads only its own samples. The shard folder is the bundled digits, written once to
~/.cache/hvdkit/data (``hvdkit data shard digits DIR`` writes one from the command line).
Reaches val_accuracy >= 0.95 in about 15 s at np=2 on a 2-core CPU (tests/test_example_recipes.py).
"""

from hvdkit.recipe import PythonRecipe


class DigitsFromFiles(PythonRecipe):
    config = {
        "name": "digits-files-tf",
        "framework": "tensorflow",
        # hvdkit's loop, which times the pipeline (data_time_s); keras_fit=true trains the same
        # pipeline with model.fit, whose compiled step hides the data time inside the step.
        "keras_fit": False,
        "model": {"name": "custom"},
        "data": {"name": "custom", "prefetch": 2, "uneven": "pad"},
        "batch_size": 32,
        "epochs": 20,
        "optimizer": {"name": "adam", "lr": 0.002, "clip_norm": 1.0},  # clipped after the allreduce
        "lr_schedule": {"scale": "sqrt", "warmup_epochs": 1, "decay": "cosine"},  # cosine after warm-up
        "label_smoothing": 0.05,
        "precision": "bf16",  # Keras' mixed_bfloat16 policy; the loss in float32
        "early_stopping": {"metric": "val_accuracy", "patience": 4, "min_delta": 0.001},
    }

    def build_data(self, seed):
        import numpy as np
        import tensorflow as tf

        from hvdkit.core.data import DataSplits
        from hvdkit.core.files import ShardFolder, digits_shards

        folder = ShardFolder.open(digits_shards(seed=seed))
        shape = folder.input_shape

        def decoder(split):
            def read(i):
                x, y = split.take(np.array([i]))
                return x[0], y[0]

            def decode(i):  # mapped by hvdkit after sharding: a rank reads its own rows only
                x, y = tf.numpy_function(read, [i], [tf.float32, tf.int64])
                return tf.ensure_shape(x, shape), tf.ensure_shape(y, ())

            return decode

        # Train and validation ids are apart: one decode reads from the right split.
        n_train = len(folder.train)
        read_train, read_val = decoder(folder.train), decoder(folder.val)

        def decode(i):
            return tf.cond(i < n_train, lambda: read_train(i), lambda: read_val(i - n_train))

        return DataSplits(tf.data.Dataset.range(n_train), tf.data.Dataset.range(n_train, n_train + len(folder.val)),
                          num_classes=folder.num_classes, input_shape=shape, decode=decode)

    def build_model(self, framework, input_shape, num_classes):
        import keras

        inp = keras.Input(input_shape)
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
        x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Dense(128, activation="relu")(keras.layers.Flatten()(x))
        return keras.Model(inp, keras.layers.Dense(num_classes)(x))
