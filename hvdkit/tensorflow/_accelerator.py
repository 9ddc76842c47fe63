"""The accelerator a TensorFlow rank trains on, by name (for tracking's host type and config).

TensorFlow loads inside the function: the autolog adapter imports this module before it knows
that the script uses TensorFlow at all.
"""

from __future__ import annotations


def accelerator_name(local_rank: int = 0) -> str | None:
    """The ``device_name`` of the GPU this rank sees (``tf.config.experimental.get_device_details``;
    the ``local_rank``-th when several are visible), or None when TensorFlow sees no GPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    try:
        details = tf.config.experimental.get_device_details(gpus[local_rank % len(gpus)])
    except (ValueError, RuntimeError):  # no details for this device
        return None
    return details.get("device_name") or None
