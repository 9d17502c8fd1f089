"""The compiled steps: the model and optimizer state laid out on the mesh, one jitted, functional
train step (``nnx.split``/``nnx.merge``) built from the task's loss, the eval step, and the
placement of batches on the devices."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.training import devices
from examples.training.task import Batch, Carry, Sums, Task


@dataclasses.dataclass(frozen=True)
class Model:
  """The model and optimizer of a run without their state, for the functional steps.

  Attributes:
    train_graph: the graph of (model, optimizer) in training mode.
    eval_graph: the same in eval mode.
    num_params: number of parameters.
    shardings: where each array of the state lives on the mesh (:func:`devices.state_shardings`).
  """

  train_graph: nnx.GraphDef
  eval_graph: nnx.GraphDef
  num_params: int
  shardings: Any = None


def _create(
  task: Task, tx: optax.GradientTransformation, root: jax.Array
) -> tuple[nnx.Module, nnx.Optimizer]:
  model = task.init_model(
    nnx.Rngs(params=jax.random.fold_in(root, 0), dropout=jax.random.fold_in(root, 2))
  )
  return model, nnx.Optimizer(model, task.transform(tx), wrt=nnx.Param)


def abstract_state(
  task: Task, tx: optax.GradientTransformation, root: jax.Array, mesh: jax.sharding.Mesh
) -> tuple[Model, Any]:
  """The model's graphs and the shapes of the state :func:`make_state` creates, each a
  ``jax.ShapeDtypeStruct`` carrying its sharding on ``mesh``: nothing is computed or allocated, so
  ``mesh`` may hold devices that are not attached (a TPU topology compiled for ahead of time)."""
  model, optimizer = nnx.eval_shape(functools.partial(_create, task, tx), root)
  model.train()
  train_graph = nnx.graphdef((model, optimizer))
  model.eval()
  eval_graph = nnx.graphdef((model, optimizer))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # The layout from the state as the program creates it (an optimizer state may hold pytrees of
  # its own, such as quantized arrays, which are traced as they are).
  shapes = jax.eval_shape(functools.partial(_created_state, task, tx), root)
  shardings = devices.state_shardings(shapes, mesh)
  placed = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  return Model(train_graph, eval_graph, int(num_params), shardings), placed


def _created_state(task: Task, tx: optax.GradientTransformation, root: jax.Array) -> nnx.State:
  return nnx.split(_create(task, tx, root))[1]


def make_state(
  task: Task, tx: optax.GradientTransformation, root: jax.Array, mesh: jax.sharding.Mesh
) -> tuple[Model, nnx.State]:
  """Initializes the task's model and an ``nnx.Optimizer`` with ``task.transform(tx)`` from ``root``.

  The parameters are drawn from ``fold_in(root, 0)`` and the dropout stream from
  ``fold_in(root, 2)``. One jitted program creates every array where it lives on ``mesh``
  (:func:`devices.state_shardings`): a split array is never whole on one device.

  Returns:
    The model's graphs and the state of (model, optimizer) (parameters, batch statistics, RNG
    streams, optimizer state), laid out over ``mesh``.
  """
  model, _ = abstract_state(task, tx, root, mesh)
  # One compiled program for all initializers: eagerly, XLA:CPU compiles a random-number kernel per
  # parameter shape, which costs seconds each on a small CPU.
  create = functools.partial(_created_state, task, tx)
  state = jax.jit(create, out_shardings=model.shardings)(root)
  return model, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered(x: jax.Array, whole: NamedSharding, split: NamedSharding) -> jax.Array:
  del split
  return jax.lax.with_sharding_constraint(x, whole)


def _gathered_fwd(x, whole, split):
  return _gathered(x, whole, split), None


def _gathered_bwd(whole, split, _, grad):
  del whole
  return (jax.lax.with_sharding_constraint(grad, split),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def gather_params(params: Any, whole: NamedSharding, split: Any) -> Any:
  """``params`` whole on every device, gathered from their shards, for the forward and backward
  passes; their gradients go back to the shards' layout ``split`` (summed over the devices and
  split in one reduction, which XLA may lower as a reduce-scatter), not to every device whole.

  This is fully sharded data parallelism (FSDP, ZeRO-3): each device computes on its own examples
  with whole parameters and keeps only its shard of parameters, gradients and optimizer state.
  Left to itself, XLA's sharding propagation may instead follow the parameters' split into the
  activations and keep every example's activations on every device.
  """
  return jax.tree.map(lambda x, s: _gathered(x, whole, s), params, split)


def _train_step(
  task: Task, graph: nnx.GraphDef, gathered, state, carry, sums, batch, epoch_key, step
):
  model, optimizer = nnx.merge(graph, state)
  rng = jax.random.fold_in(epoch_key, step)

  def loss_fn(model):
    if gathered is not None:  # fsdp > 1: whole parameters, gradients back to their shards
      nnx.update(model, gather_params(nnx.state(model, nnx.Param), *gathered))
    return task.loss(model, batch, carry, rng, train=True)

  (_, (carry, batch_sums)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  sums = {k: sums[k] + batch_sums[k].astype(jnp.float32) for k in sums}
  return nnx.state((model, optimizer)), jax.lax.stop_gradient(carry), sums


def _train_chunk(
  task: Task,
  graph: nnx.GraphDef,
  gathered,
  sharded,
  loop: bool,
  state,
  carry,
  sums,
  data,
  order,
  epoch_key,
  first,
  n,
):
  """Steps ``first`` ... ``first + n - 1`` of an epoch in one program, each cutting its batch from
  ``data`` (``first`` and ``n`` are runtime values: one program serves every call), or with
  ``loop`` False the one step ``first``."""

  def body(step, values):
    state, carry, sums = values
    batch = jax.lax.with_sharding_constraint(task.train_batch(data, order, step), sharded)
    return _train_step(task, graph, gathered, state, carry, sums, batch, epoch_key, step)

  values = (state, carry, sums)
  # n is static: one step is the body alone (XLA:CPU runs a convolution inside a loop many times
  # slower than outside one); more steps are a loop over runtime bounds.
  if not loop:
    state, carry, sums = body(first, values)
  else:
    state, carry, sums = jax.lax.fori_loop(first, first + n, body, values)
  # The sums once more, not donated to the next call: the host reads them while it runs.
  return state, carry, sums, {k: v + 0.0 for k, v in sums.items()}


def _eval_step(task: Task, graph: nnx.GraphDef, state, carry, batch):
  model, _ = nnx.merge(graph, state)
  _, (carry, sums) = task.loss(model, batch, carry, jax.random.key(0), train=False)
  return carry, {k: v.astype(jnp.float32) for k, v in sums.items()}


class Steps:
  """The jitted train and eval steps of a run, and the placement of batches on the mesh.

  The train step is compiled once, on the first batch (:meth:`compile`), before any clock starts.
  Both steps take and give the state in its layout (``model.shardings``) and batches split over
  every device of the mesh.

  Attributes:
    mesh: the ``data`` x ``fsdp`` mesh.
    num_devices: devices the batch axis is split over (all of the mesh's).
    replicated: the sharding of the metric sums (and of the state's small arrays).
    batch_sharded: the sharding of batches and carries (leading axis over every mesh axis).
    eval: the jitted eval step, ``(state, carry, batch) -> (carry, sums)``.
  """

  def __init__(self, task: Task, model: Model, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.num_devices = mesh.devices.size
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharded = NamedSharding(mesh, P(devices.MESH_AXES))
    self._task = task
    self._train_graph = model.train_graph
    self._state_shardings = state = model.shardings
    # Under fsdp > 1 the step gathers the parameters before it uses them (gather_params).
    gathered = None
    if mesh.shape[devices.FSDP_AXIS] > 1:
      gathered = (self.replicated, nnx.filter_state(state[0], nnx.Param))
    # The key and the step index are host values of every process (None: replicated).
    self._train = jax.jit(
      functools.partial(_train_step, task, model.train_graph, gathered),
      donate_argnums=(0, 1, 2),
      in_shardings=(state, self.batch_sharded, self.replicated, self.batch_sharded, None, None),
      out_shardings=(state, self.batch_sharded, self.replicated),
    )
    self._compiled = None
    self._compiled_chunks: dict[bool, Any] = {}
    # For a task that gives its training data: the steps that cut their batches from it.
    self._order = jax.jit(task.epoch_order, out_shardings=self.replicated)
    chunk = functools.partial(_train_chunk, task, model.train_graph, gathered, self.batch_sharded)
    shardings = (state, self.batch_sharded, self.replicated, self.replicated, self.replicated)
    self._chunks = {
      loop: jax.jit(
        functools.partial(chunk, loop),
        donate_argnums=(0, 1, 2),
        in_shardings=(*shardings, None, None, None),
        out_shardings=(state, self.batch_sharded, self.replicated, self.replicated),
      )
      for loop in (False, True)
    }
    self.eval = jax.jit(
      functools.partial(_eval_step, task, model.eval_graph),
      in_shardings=(state, self.batch_sharded, self.batch_sharded),
      out_shardings=(self.batch_sharded, self.replicated),
    )

  def place_data(self, data: Any) -> Any:
    """Places a task's :meth:`~Task.train_data` on every device, whole (each process places it on
    its own devices)."""
    if jax.process_count() == 1:
      return jax.device_put(data, self.replicated)
    return jax.tree.map(lambda x: devices.global_array(np.asarray(x), self.replicated), data)

  def lower(
    self,
    state: Any,
    carry: Carry,
    sums: Sums,
    key: jax.Array,
    *,
    batch: Batch = None,
    data: Any = None,
    order: Any = None,
    steps_per_call: int = 1,
  ) -> jax.stages.Lowered:
    """The train step the loop calls, lowered for these arguments (arrays, or
    ``jax.ShapeDtypeStruct`` with their shardings: nothing runs). Without ``data``, the step on
    ``batch``; with a task's placed training data, the call that cuts its batches from them: one
    step, or with ``steps_per_call`` > 1 a loop of any number of steps (``--steps-per-call``)."""
    if data is None:
      return self._train.lower(state, carry, sums, batch, key, np.int32(0))
    loop = steps_per_call > 1
    args = (state, carry, sums, data, order, key, np.int32(0), np.int32(max(steps_per_call, 2)))
    return self._chunks[loop].lower(*args)

  def epoch_order(self, epoch_key: jax.Array) -> Any:
    """The task's order of an epoch's batches, computed on the devices."""
    return self._order(epoch_key)

  def chunk_sums(self, state: Any, carry: Carry, data: Any, order: Any, key: jax.Array, start):
    """The metric sums of the task's loss, each at its value in ``start`` or zero (as
    :meth:`zero_sums`, with the batch the data give)."""
    batch = jax.eval_shape(self._task.train_batch, data, order, jax.numpy.int32(0))
    return self.zero_sums(state, carry, batch, key, start)

  def compile_chunk(self, state, carry, sums, data, order, key: jax.Array, loop: bool) -> None:
    """Compiles the call of one step (``loop`` False) or of several (True) for these shapes, once
    per run (any ``first`` and number of steps)."""
    if loop not in self._compiled_chunks:
      lowered = self.lower(
        state, carry, sums, key, data=data, order=order, steps_per_call=2 if loop else 1
      )
      self._compiled_chunks[loop] = lowered.compile()

  def train_chunk(
    self, state, carry, sums, data, order, key: jax.Array, first: int, n: int
  ) -> tuple[Any, Carry, Sums, Sums]:
    """Steps ``first`` to ``first + n - 1`` of the epoch in one call; ``state``, ``carry`` and
    ``sums`` are donated. Returns them, and a copy of the sums for the host to read."""
    args = (state, carry, sums, data, order, key, np.int32(first), np.int32(n))
    return self._compiled_chunks[n > 1](*args)

  def shard(self, tree: Any) -> Any:
    """Places a batch (or carry) with its leading axis split over the devices.

    In a multi-process run every process holds the same global batch (the same data, order and
    seed); each places only the rows of its own devices.
    """
    if jax.process_count() == 1:
      return jax.device_put(tree, self.batch_sharded)
    return jax.tree.map(lambda x: devices.global_array(np.asarray(x), self.batch_sharded), tree)

  def sum_names(self, state: Any, carry: Carry, batch: Batch, key: jax.Array) -> list[str]:
    """The names of the metric sums the task's loss returns, found by tracing it (not running it);
    the arguments may be ``jax.ShapeDtypeStruct``."""

    def batch_sums(state, carry, batch, key):
      model, _ = nnx.merge(self._train_graph, state)
      return self._task.loss(model, batch, carry, key, train=True)[1][1]

    names = sorted(jax.eval_shape(batch_sums, state, carry, batch, key))
    if "count" not in names:
      raise ValueError("Task.loss must return sums with a 'count' entry")
    return names

  def zero_sums(
    self,
    state: Any,
    carry: Carry,
    batch: Batch,
    key: jax.Array,
    start: Mapping[str, float] | None = None,
  ) -> Sums:
    """The metric sums the task's loss returns (:meth:`sum_names`), each at its value in ``start``
    (a run resumed inside an epoch) or zero."""
    names = self.sum_names(state, carry, batch, key)
    start = start or {}
    if start and set(start) != set(names):
      raise ValueError(f"the checkpoint's sums {sorted(start)} are not the task's {names}")
    return {k: jax.device_put(np.float32(start.get(k, 0.0)), self.replicated) for k in names}

  def compile(self, state: Any, carry: Carry, sums: Sums, batch: Batch, key: jax.Array) -> None:
    """Compiles the train step for these shapes, once per run."""
    if self._compiled is None:
      self._compiled = self.lower(state, carry, sums, key, batch=batch).compile()

  def train(
    self, state: Any, carry: Carry, sums: Sums, batch: Batch, key: jax.Array, index: int
  ) -> tuple[Any, Carry, Sums]:
    """One optimizer step; ``state``, ``carry`` and ``sums`` are donated."""
    return self._compiled(state, carry, sums, batch, key, np.int32(index))
