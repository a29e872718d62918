"""Device mesh and logical-axis sharding rules.

The mesh has three axes: `data` (pure data parallelism, also across slices), `fsdp` (data
parallelism whose parameters and optimizer state are split over it) and `tensor` (model
parallelism of heads, mlp and vocab). Modules name their axes logically (`batch`, `embed`,
`heads`, ...); `logical_axis_rules` maps those names onto mesh axes.
"""
import contextlib
import functools
import logging
from typing import Any, Optional, Sequence

from flax import linen as nn
import jax
from jax.experimental import mesh_utils

from scone_jax import config as config_lib

# The mesh axes, the logical axis names, the default rules and the mesh-shape arithmetic are
# part of the config schema (config.py); these names stay here for callers.
MESH_AXES = config_lib.MESH_AXES
LOGICAL_AXES = config_lib.LOGICAL_AXES
DEFAULT_RULES = config_lib.DEFAULT_RULES
resolve_mesh_shape = config_lib.resolve_mesh_shape


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), laid out for the topology."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  dcn_data = int(_field(mesh_cfg, 'dcn_data', 1))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if dcn_data > 1 and hasattr(devices[0], 'slice_index'):
    ici_shape = (sizes['data'] // dcn_data, sizes['fsdp'], sizes['tensor'])
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, (dcn_data, 1, 1), devices)
  else:
    if dcn_data > 1:
      logging.warning('mesh dcn_data=%d but the devices have no slice_index (not a multi-slice '
                      'TPU); laying out one flat mesh of shape %s.', dcn_data, shape)
    try:
      device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
      # Some TPU topologies only fit a shape by splitting a physical axis.
      logging.warning('mesh %s does not map onto the physical topology (%s); splitting '
                      'physical axes.', shape, e)
      device_array = mesh_utils.create_device_mesh(shape, devices,
                                                   allow_split_physical_axes=True)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def logical_axis_rules(cfg=None) -> tuple:
  """Logical → mesh axis rules: `cfg.logical_axis_rules` (pairs), DEFAULT_RULES if empty/None."""
  custom = cfg.logical_axis_rules if cfg is not None else None
  if custom:
    return tuple((str(name), _mesh_axes(axes)) for name, axes in custom)
  return DEFAULT_RULES


def logical_to_sharding(logical_spec_tree, mesh: jax.sharding.Mesh, rules):
  """A tree of logical PartitionSpecs → the same tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules):
  """Makes `mesh` and `rules` current, so the model's logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def under_mesh(jitted, mesh: jax.sharding.Mesh, rules):
  """`jitted`, called with the mesh and logical rules current (its constraints trace under
  them). The jitted function stays reachable as `.jitted` (e.g. for its cache size);
  `.lower(*args)` lowers it under the mesh too (arguments may be ShapeDtypeStructs:
  ahead-of-time compile)."""
  @functools.wraps(jitted)
  def call(*args):
    with mesh_context(mesh, rules):
      return jitted(*args)

  def lower(*args):
    with mesh_context(mesh, rules):
      return jitted.lower(*args)
  call.jitted = jitted
  call.lower = lower
  return call


def init_sharded(model: nn.Module, rng, example_inputs: dict, mesh: jax.sharding.Mesh, rules):
  """Initialises `model`'s params directly in their shardings.

  example_inputs are the keyword arguments of `model.__call__` (e.g. {'inputs_BxL': ...}).
  Returns (params, param_shardings): plain arrays (no nn.Partitioned boxes) and the matching
  tree of NamedShardings.
  """
  def init_boxed(rng):
    return model.init({'params': rng}, **example_inputs)['params']

  with mesh_context(mesh, rules):
    abstract = jax.eval_shape(init_boxed, rng)
    param_shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)
    params = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=param_shardings)(rng)
  return params, param_shardings


def abstract_params(model: nn.Module, example_inputs: dict, mesh: jax.sharding.Mesh, rules):
  """(abstract params, param shardings): ShapeDtypeStructs placed in their shardings, for a
  restore that lands directly on the mesh without initialising anything."""
  def init_boxed(rng):
    return model.init({'params': rng}, **example_inputs)['params']

  # An abstract key: nothing runs, so the mesh's devices need not be this host's.
  key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(init_boxed, key)
    param_shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), param_shardings)
  return abstract, param_shardings


def batch_sharding(mesh: jax.sharding.Mesh, rules, ndim: int) -> jax.sharding.NamedSharding:
  """Leading dim over the batch axes, the rest replicated."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules)
  return jax.sharding.NamedSharding(mesh, spec)


def _field(cfg, name, default):
  if cfg is None:
    return default
  if hasattr(cfg, 'get'):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def _mesh_axes(axes):
  if axes is None or isinstance(axes, str):
    return axes
  return tuple(axes)


# ----------------------------------------------------------------------------- serving


def parse_serving_mesh(text: Optional[str]) -> int:
  """`--mesh` → the tensor-parallel size: '' → 0 (no mesh: one device, as before),
  'tensor:N' or 'N' → N, with N = -1 meaning every local device."""
  text = (text or '').strip()
  if not text:
    return 0
  axis, _, size = text.rpartition(':')
  if axis not in ('', 'tensor'):
    raise ValueError(f'--mesh={text}: serving shards the model over the tensor axis only '
                     '(heads and MLP); use --mesh=tensor:N (or --mesh=N).')
  try:
    n = int(size)
  except ValueError:
    n = 0
  if n == 0 or n < -1:
    raise ValueError(f'--mesh={text}: expected tensor:N (or N) with N a positive number of '
                     'local devices, or -1 for all of them.')
  return n


def serving_mesh(text: Optional[str], devices: Optional[Sequence[Any]] = None):
  """The serving mesh of `--mesh` (see parse_serving_mesh): the training mesh's axes with
  data = fsdp = 1 and tensor = N over the first N local devices; None without --mesh."""
  n = parse_serving_mesh(text)
  if not n:
    return None
  devices = list(jax.local_devices() if devices is None else devices)
  n = len(devices) if n == -1 else n
  if n > len(devices):
    raise ValueError(f'--mesh={text} needs {n} devices but this host has {len(devices)} local '
                     f'{devices[0].platform} device(s); use --mesh=tensor:N with N <= '
                     f'{len(devices)}.')
  return make_mesh({'data': 1, 'fsdp': 1, 'tensor': n}, devices[:n])
