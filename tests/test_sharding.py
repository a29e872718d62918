"""Mesh shapes, rules, and parameters created already sharded."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scone_jax import model as model_lib
from scone_jax import sharding


def _mesh_cfg(data=-1, fsdp=1, tensor=1, dcn_data=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn_data))


@pytest.mark.parametrize('axes,n,want', [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 1, -1), 8, (1, 1, 8)),
    ((2, 4, 1), 8, (2, 4, 1)),
])
def test_resolve_mesh_shape(axes, n, want):
  got = sharding.resolve_mesh_shape(_mesh_cfg(*axes), n)
  assert (got['data'], got['fsdp'], got['tensor']) == want


def test_dcn_multiplies_data_across_slices():
  got = sharding.resolve_mesh_shape(_mesh_cfg(-1, 2, 1, dcn_data=2), 8)
  assert got == {'data': 4, 'fsdp': 2, 'tensor': 1}


@pytest.mark.parametrize('axes,n,match', [
    ((3, -1, 1), 8, 'do not divide'),
    ((2, 2, 1), 8, 'does not match'),
    ((-1, -1, 1), 8, 'only one axis'),
    ((0, -1, 1), 8, 'positive or -1'),
])
def test_bad_mesh_is_refused(axes, n, match):
  with pytest.raises(ValueError, match=match):
    sharding.resolve_mesh_shape(_mesh_cfg(*axes), n)


def test_params_are_created_sharded():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  cfg = model_lib.ModelConfig(vocab_size=64, num_layers=1, d_model=16, num_heads=2,
                              head_dim=8, mlp_dim=32, dtype='float32', fgrams_enabled=True,
                              fgram_max_len=3, fgram_num_layers=1, fgram_num_heads=2,
                              fgram_head_dim=8, fgram_mlp_dim=32)
  m = model_lib.SconeLM(cfg)
  params, shardings = sharding.init_sharded(
      m, jax.random.PRNGKey(0), {'inputs_BxL': jnp.zeros((4, 8), jnp.int32)}, mesh,
      sharding.logical_axis_rules())
  wi = params['decoder']['layers_0']['mlp']['wi']['kernel']
  assert wi.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  # Each device holds a quarter of [embed=16, mlp=32]: split over fsdp and tensor.
  assert {s.data.shape for s in wi.addressable_shards} == {(8, 16)}
  q = params['fgram_model']['layers_0']['attention']['query']['kernel']
  assert q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  assert shardings['token_embed']['embedding'].spec == jax.sharding.PartitionSpec(
      'tensor', 'fsdp')
  # Same values as an unsharded init (jit may fuse the init's scaling differently: 1 ulp).
  plain = nn.unbox(m.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((4, 8), jnp.int32)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-6, atol=1e-8),
               params, plain['params'])


def test_custom_rules_replace_the_defaults():
  cfg = ml_collections.ConfigDict({'logical_axis_rules': [('batch', ['data']), ('mlp', None)]})
  assert sharding.logical_axis_rules(cfg) == (('batch', ('data',)), ('mlp', None))
