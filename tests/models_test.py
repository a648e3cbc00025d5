"""Tests for draco_jax.models: shapes, parameter counts, the functional split/merge pattern.

Speed on 2 cores: every distinct parameter shape costs one XLA compile of the initialiser, about
1 s with the default threefry keys and 0.1 s with "rbg" keys, so the tiny models use rbg keys and
are built once per module; full-size models are only counted abstractly (jax.eval_shape).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from draco_jax import models

# (name, tiny options, input_shape): one small instance per registered model.
TINY_CASES = [
  ("mlp", {"hidden": (16, 8)}, (8, 8, 1)),
  ("lenet", {"width": 0.5}, (8, 8, 1)),
  ("resnet18", {"width": 4, "stage_sizes": (1, 1)}, (8, 8, 3)),
  ("vgg", {"depth": 11, "width": 1 / 16}, (8, 8, 3)),
]
NUM_CLASSES = 10


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.cache
def _tiny(name):
  """The TINY_CASES model called ``name``, built once."""
  ((options, input_shape),) = [(o, s) for n, o, s in TINY_CASES if n == name]
  return models.make_model(
    name, num_classes=NUM_CLASSES, input_shape=input_shape, rngs=_rngs(), **options
  )


def _num_params(name, input_shape, **options):
  """Parameter count of a model, from abstract shapes only (nothing is initialised)."""
  abstract = jax.eval_shape(
    lambda: nnx.state(
      models.make_model(
        name, num_classes=NUM_CLASSES, input_shape=input_shape, rngs=nnx.Rngs(0), **options
      ),
      nnx.Param,
    )
  )
  return sum(leaf.size for leaf in jax.tree.leaves(abstract))


def test_every_registered_model_has_a_tiny_case():
  assert sorted(name for name, _, _ in TINY_CASES) == sorted(models.MODELS)


def _forward(graphdef):
  return jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))


@pytest.mark.parametrize("name,options,input_shape", TINY_CASES)
def test_output_and_split_merge_round_trip(name, options, input_shape):
  del options
  model = _tiny(name)
  graphdef, params = nnx.split(model, nnx.Param)
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))  # no other state channel
  forward = _forward(graphdef)
  x_NxHxWxC = jax.random.normal(jax.random.key(1), (3, *input_shape))
  logits_NxC = forward(params, x_NxHxWxC)
  assert logits_NxC.shape == (3, NUM_CLASSES)
  assert logits_NxC.dtype == jnp.float32
  assert np.all(np.isfinite(logits_NxC))
  # Round trip: merge then split again gives the same params and the same logits.
  graphdef_again, params_again = nnx.split(nnx.merge(graphdef, params), nnx.Param)
  assert graphdef_again == graphdef
  jax.tree.map(np.testing.assert_array_equal, params, params_again)
  np.testing.assert_array_equal(forward(params_again, x_NxHxWxC), logits_NxC)


@pytest.mark.parametrize("name,options,input_shape", TINY_CASES)
def test_vmap_grad_over_partitions_under_jit(name, options, input_shape):
  """The training step's pattern: params only, merge inside jit, vmap(grad) over partitions."""
  del options
  graphdef, params = nnx.split(_tiny(name), nnx.Param)
  num_partitions, batch = 3, 2
  x_KxBxHxWxC = jax.random.normal(jax.random.key(2), (num_partitions, batch, *input_shape))
  y_KxB = jax.random.randint(jax.random.key(3), (num_partitions, batch), 0, NUM_CLASSES)
  # Partition 2 replicates partition 0, as two honest DRACO workers would.
  x_KxBxHxWxC = x_KxBxHxWxC.at[2].set(x_KxBxHxWxC[0])
  y_KxB = y_KxB.at[2].set(y_KxB[0])

  def loss(p, x_BxHxWxC, y_B):
    logits = nnx.merge(graphdef, p)(x_BxHxWxC)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean()

  grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x_KxBxHxWxC, y_KxB)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g_K, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g_K.shape == (num_partitions, *p.shape) and g_K.dtype == jnp.float32
    assert np.all(np.isfinite(g_K))
    # Replicas are bit-identical: the gradient is a pure function of (params, data).
    np.testing.assert_array_equal(g_K[2], g_K[0])
  flat_K = [np.concatenate([g[k].ravel() for g in jax.tree.leaves(grads)]) for k in range(2)]
  assert not np.allclose(flat_K[0], flat_K[1])


def test_paper_mlp_param_count():
  assert _num_params("mlp", (28, 28, 1)) == 784 * 800 + 800 + 800 * 500 + 500 + 500 * 10 + 10
  assert _num_params("mlp", (28, 28, 1)) == 1_033_510


@pytest.mark.parametrize(
  "name,options,input_shape,expected",
  [
    ("resnet18", {}, (32, 32, 3), 11_173_962),  # same count as the BatchNorm ResNet-18
    ("vgg", {"depth": 16}, (32, 32, 3), 14_724_042),  # bias-free convs + GN + 512->10 head
    ("lenet", {}, (28, 28, 1), 107_786),
  ],
)
def test_full_size_param_counts(name, options, input_shape, expected):
  assert _num_params(name, input_shape, **options) == expected


def test_width_and_depth_options_change_size():
  vgg = [_num_params("vgg", (8, 8, 3), depth=d, width=1 / 16) for d in (11, 13, 16)]
  assert vgg[0] < vgg[1] < vgg[2]
  assert _num_params("vgg", (8, 8, 3), depth=11, width=1 / 32) < vgg[0]
  assert _num_params("lenet", (8, 8, 1), width=0.5) < _num_params("lenet", (8, 8, 1))
  tiny_resnet = _num_params("resnet18", (8, 8, 3), width=4, stage_sizes=(1, 1))
  assert tiny_resnet < _num_params("resnet18", (8, 8, 3), width=8, stage_sizes=(1, 1))
  assert _tiny("resnet18").head.in_features == 4 * 2**1
  assert _num_params("mlp", (8, 8, 1), hidden=(16,)) == 64 * 16 + 16 + 16 * 10 + 10


def test_registry_errors():
  with pytest.raises(ValueError, match=r"unknown model 'nope'.*lenet.*mlp.*resnet18.*vgg"):
    models.make_model("nope", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"model 'mlp': unknown options \['depth'\]; valid options: hidden"
  ):
    models.make_model("mlp", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0), depth=3)
  with pytest.raises(ValueError, match=r"depth must be one of \[11, 13, 16\]"):
    models.make_model("vgg", num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0), depth=19)
  with pytest.raises(ValueError, match="input_shape must be"):
    models.make_model("lenet", num_classes=10, input_shape=(64,), rngs=nnx.Rngs(0))
  assert models.model_options("resnet18") == {"width": 64, "stage_sizes": (2, 2, 2, 2)}
