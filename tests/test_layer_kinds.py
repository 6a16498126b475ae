"""One set of supported layer kinds: discovery, removal, the pruned runner and the cost count agree.

Every standard linen and NNX layer that can touch channels sits between a stem conv and a
consumer conv. A supported kind must give: masked == physically removed (``run_pruned``), and
``count_cost`` of the removed model == the cost model's prediction == an independent count of
the smaller model's own trace (every conv/matmul's output size x reduction length). Any other
kind is refused at discovery by an error naming the layer (or kept unpruned with
``on_unsupported='freeze'``).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttmpd_jax import pruning
from ttmpd_jax.pruning.testing import randomize, random_variables

C = 8  # Channels entering and leaving the layer under test.
IMAGE = (6, 6, 3)


def trace_macs(fn, *args) -> int:
  """Multiply-accumulates of every conv/matmul in ``fn``'s jaxpr (sub-jaxprs included)."""

  def walk(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      out = int(np.prod(eqn.outvars[0].aval.shape)) if eqn.outvars else 0
      if eqn.primitive.name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        total += out * int(np.prod(rhs)) // rhs[eqn.params['dimension_numbers'][1][0]]
      elif eqn.primitive.name == 'dot_general':
        lhs = eqn.invars[0].aval.shape
        total += out * int(np.prod([lhs[d] for d in eqn.params['dimension_numbers'][0][0]]))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if isinstance(sub, jex.ClosedJaxpr):
            total += walk(sub.jaxpr)
          elif isinstance(sub, jex.Jaxpr):
            total += walk(sub)
    return total

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def check_supported(model, variables, x):
  """Masked == removed, run_pruned runs, cost exact; returns the removed variables."""
  groups = pruning.discover_groups(model, variables, x)
  prunable = pruning.prunable_groups(groups)
  assert prunable, groups
  masks = {g.name: np.arange(g.size) % 3 != 1 for g in prunable}
  y_masked = model.apply(pruning.apply_masks(variables, masks, groups), x)
  small = pruning.remove_channels(variables, groups, masks)
  y_small = pruning.run_pruned(model, small, x)
  np.testing.assert_allclose(np.asarray(y_small), np.asarray(y_masked), rtol=0, atol=2e-5)
  assert float(jnp.abs(y_masked).max()) > 1e-3
  measured = pruning.count_cost(model, small, IMAGE)
  params = sum(int(np.size(p)) for p in jax.tree.leaves(small['params']))
  macs = trace_macs(lambda v, x: pruning.run_pruned(model, v, x), small, x[:1])
  assert measured == pruning.Cost(macs, params)
  assert pruning.cost_model(model, variables, groups, IMAGE)(pruning.kept_counts(masks)) == measured
  assert measured.macs < pruning.count_cost(model, variables, IMAGE).macs
  return small


def check_refused(model, variables, x, needle):
  with pytest.raises(pruning.UnsupportedLayerError, match=needle):
    pruning.discover_groups(model, variables, x)
  groups = pruning.discover_groups(model, variables, x, on_unsupported='freeze')
  assert any(not g.prunable and re.search(needle, g.reason) for g in groups), groups
  masks = {g.name: np.arange(g.size) % 3 != 1 for g in pruning.prunable_groups(groups)}
  small = pruning.remove_channels(variables, groups, masks)
  np.testing.assert_allclose(
      np.asarray(pruning.run_pruned(model, small, x)),
      np.asarray(model.apply(pruning.apply_masks(variables, masks, groups), x)), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# linen: (id, layer applied to x [N, H, W, C] inside the model, None or the refusal's text).

def _seq(x, layer):
  n, h, w, c = x.shape
  return layer(x.reshape((n, h * w, c))).reshape((n, h, w, -1))


LINEN = [
    ('Conv', lambda x: nn.Conv(C, (3, 3))(x), None),
    ('Conv-strided-dilated', lambda x: nn.Conv(C, (3, 3), strides=2, kernel_dilation=2,
                                               padding=((1, 2), (2, 1)))(x), None),
    ('Conv-circular', lambda x: nn.Conv(C, (3, 3), padding='CIRCULAR')(x), None),
    ('Conv-depthwise', lambda x: nn.Conv(C, (3, 3), feature_group_count=C)(x), None),
    ('Conv-grouped', lambda x: nn.Conv(C, (3, 3), feature_group_count=2)(x),
     'grouped convolution'),
    ('ConvTranspose', lambda x: nn.ConvTranspose(C, (3, 3), strides=(2, 2))(x), None),
    ('ConvLocal', lambda x: nn.ConvLocal(C, (3, 3))(x), 'ConvLocal_0'),
    ('Dense', lambda x: nn.Dense(C)(x), None),
    ('DenseGeneral', lambda x: nn.DenseGeneral(C)(x), None),
    ('Einsum', lambda x: nn.Einsum((C, C), '...i,ij->...j')(x), None),
    ('BatchNorm', lambda x: nn.BatchNorm(use_running_average=True)(x), None),
    ('InstanceNorm', lambda x: nn.InstanceNorm()(x), None),
    ('LayerNorm', lambda x: nn.LayerNorm()(x), "'LayerNorm_0' \\(LayerNorm\\)"),
    ('GroupNorm', lambda x: nn.GroupNorm(num_groups=2)(x), "'GroupNorm_0' \\(GroupNorm\\)"),
    ('RMSNorm', lambda x: nn.RMSNorm()(x), "'RMSNorm_0' \\(RMSNorm\\)"),
    ('Dropout', lambda x: nn.Dropout(0.5, deterministic=True)(x), None),
    ('Embed', lambda x: x + nn.Embed(4, C)(jnp.zeros(x.shape[:3], jnp.int32)),
     'Embed_0'),
    ('MultiHeadDotProductAttention',
     lambda x: _seq(x, nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=C)),
     "\\(MultiHeadDotProductAttention\\)"),
    ('avg_pool', lambda x: nn.avg_pool(x, (2, 2), (1, 1), padding='SAME'), None),
    ('max_pool', lambda x: nn.max_pool(x, (3, 3), (2, 2)), None),
    ('PReLU', lambda x: nn.PReLU()(x), None),
    ('activations', lambda x: nn.gelu(nn.silu(jnp.tanh(nn.sigmoid(x) * nn.relu6(x)))), None),
    ('softmax-over-channels', lambda x: nn.softmax(x, axis=-1), 'reduces over a channel axis'),
    ('concatenate', lambda x: jnp.concatenate([x, nn.Conv(4, (1, 1))(x)], -1), None),
    ('flatten-Dense', lambda x: nn.Dense(C)(x.reshape((x.shape[0], -1)))[:, None, None, :],
     None),
]


class LinenCase(nn.Module):
  layer: object

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(not train, name='stem_bn')(nn.Conv(C, (3, 3), name='stem')(x)))
    x = self.layer(x)
    x = nn.relu(nn.Conv(6, (1, 1), name='after')(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


FAST_LINEN = {'Conv-depthwise', 'ConvTranspose', 'DenseGeneral', 'LayerNorm',
              'MultiHeadDotProductAttention', 'concatenate', 'Conv-grouped'}


def _marks(kind, fast):
  return () if kind in fast else (pytest.mark.slow,)


@pytest.mark.parametrize('layer,refusal', [
    pytest.param(layer, refusal, id=kind, marks=_marks(kind, FAST_LINEN))
    for kind, layer, refusal in LINEN])
def test_linen_layer_kind(layer, refusal):
  model = LinenCase(layer)
  x = jax.random.normal(jax.random.key(0), (2, *IMAGE))
  variables = random_variables(model, x, seed=1)
  if refusal is None:
    check_supported(model, variables, x)
  else:
    check_refused(model, variables, x, refusal)


# ----------------------------------------------------------------------------------------------
# NNX: (id, layer factory, how it is applied, None or the refusal's text).

NNX = [
    ('nnx.Conv', lambda r: nnx.Conv(C, C, (3, 3), rngs=r), None, None),
    ('nnx.Conv-strided-dilated', lambda r: nnx.Conv(C, C, (3, 3), strides=2, kernel_dilation=2,
                                                    padding='VALID', rngs=r), None, None),
    ('nnx.Conv-depthwise', lambda r: nnx.Conv(C, C, (3, 3), feature_group_count=C, rngs=r),
     None, None),
    ('nnx.Conv-grouped', lambda r: nnx.Conv(C, C, (3, 3), feature_group_count=2, rngs=r), None,
     'grouped convolution'),
    ('nnx.ConvTranspose', lambda r: nnx.ConvTranspose(C, C, (3, 3), strides=2, rngs=r), None,
     None),
    ('nnx.Linear', lambda r: nnx.Linear(C, C, rngs=r), None, None),
    ('nnx.LinearGeneral', lambda r: nnx.LinearGeneral(C, C, rngs=r), None, None),
    ('nnx.Einsum', lambda r: nnx.Einsum('...i,ij->...j', (C, C), (C,), rngs=r), None, None),
    ('nnx.BatchNorm', lambda r: nnx.BatchNorm(C, rngs=r), None, None),
    ('nnx.InstanceNorm', lambda r: nnx.InstanceNorm(C, rngs=r), None, None),
    ('nnx.LayerNorm', lambda r: nnx.LayerNorm(C, rngs=r), None, "'layer' \\(LayerNorm\\)"),
    ('nnx.GroupNorm', lambda r: nnx.GroupNorm(C, num_groups=2, rngs=r), None,
     "'layer' \\(GroupNorm\\)"),
    ('nnx.RMSNorm', lambda r: nnx.RMSNorm(C, rngs=r), None, "'layer' \\(RMSNorm\\)"),
    ('nnx.Dropout', lambda r: nnx.Dropout(0.5, rngs=r), None, None),
    ('nnx.Embed', lambda r: nnx.Embed(4, C, rngs=r),
     lambda m, x: x + m(jnp.zeros(x.shape[:3], jnp.int32)), "primitive 'gather'"),
    ('nnx.MultiHeadAttention',
     lambda r: nnx.MultiHeadAttention(2, C, qkv_features=C, decode=False, rngs=r),
     lambda m, x: _seq(x, m), "'layer' \\(MultiHeadAttention\\)"),
    ('nnx.PReLU', lambda r: nnx.PReLU(), None, None),
    ('nnx.activations+pool+concat',
     lambda r: nnx.Conv(C, 4, (1, 1), rngs=r),
     lambda m, x: nnx.max_pool(jnp.concatenate([nnx.gelu(x), m(x)], -1), (2, 2), (1, 1)), None),
]


class NNXCase(nnx.Module):

  def __init__(self, make, call, rngs):
    self.stem = nnx.Conv(IMAGE[-1], C, (3, 3), rngs=rngs)
    self.stem_bn = nnx.BatchNorm(C, rngs=rngs)
    self.layer = make(rngs)
    self.call = call
    width = C + 4 if call is not None and 'concatenate' in getattr(call, '__code__').co_names \
        else C
    self.after = nnx.Conv(width, 6, (1, 1), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = self.layer(x) if self.call is None else self.call(self.layer, x)
    x = nnx.relu(self.after(x))
    return self.head(x.mean(axis=(1, 2)))


FAST_NNX = {'nnx.Conv-depthwise', 'nnx.LinearGeneral', 'nnx.LayerNorm', 'nnx.MultiHeadAttention',
            'nnx.activations+pool+concat'}


def nnx_case(make, call, seed=1):
  adapter, variables = pruning.from_nnx(NNXCase(make, call, nnx.Rngs(0)))
  return adapter, randomize(variables, seed)


@pytest.mark.parametrize('make,call,refusal', [
    pytest.param(make, call, refusal, id=kind, marks=_marks(kind, FAST_NNX))
    for kind, make, call, refusal in NNX])
def test_nnx_layer_kind(make, call, refusal):
  adapter, variables = nnx_case(make, call)
  x = jax.random.normal(jax.random.key(0), (2, *IMAGE))
  if refusal is not None:
    check_refused(adapter, variables, x, refusal)
    return
  small = check_supported(adapter, variables, x)
  # The module of the new sizes runs on its own and agrees with the pruned runner.
  module = nnx.view(adapter.to_module(small), deterministic=True, use_running_average=True,
                    raise_if_not_found=False)
  np.testing.assert_allclose(np.asarray(module(x)),
                             np.asarray(pruning.run_pruned(adapter, small, x)), atol=1e-6)
