"""Device mesh and shardings: data parallel over `data`, tensor parallel over `model`."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(*, model_parallel=1, devices=None):
    """A (data, model) mesh over `devices` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise ValueError(
            f"model_parallel={model_parallel} does not divide the {len(devices)} devices; "
            f"choose a divisor of {len(devices)}")
    grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, ("data", "model"))


def replicated(mesh):
    return NamedSharding(mesh, P())


def data_sharded(mesh):
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, P("data"))


def global_batch(mesh, host_batch):
    """Host-local numpy arrays (this process's rows) -> global arrays split over `data`."""
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)

