"""Which manual mesh axes an array varies over inside `shard_map`, and casts that add axes.

A pallas_call's result is typed invariant, and a custom VJP must return each cotangent with its input's
type; the MoE layer also marks weights as varying over the token axes. One helper for all of them, and
the one place that knows how each JAX version spells the type.
"""
import jax


def varying_axes(x) -> frozenset:
  """The manual mesh axes `x` varies over (`manual_axis_type.varying` in jax 0.10, `vma` later)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def vary_over(axes, x):
  """`x` typed as varying over `axes` too (its transpose sums over the axes it adds)."""
  missing = tuple(sorted(frozenset(axes) - varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_like(y, *likes):
  """`y` typed as varying over every mesh axis the `likes` vary over."""
  return vary_over(frozenset().union(*map(varying_axes, likes)), y)


def result_type(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A kernel result's type, varying over the mesh axes `like` varies over. Under shard_map a pallas_call
  must be told, even when that set is empty; outside shard_map the annotation is ignored."""
  aval = jax.typeof(like)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
  if getattr(aval, "vma", None) is not None:
    return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
  return jax.ShapeDtypeStruct(shape, dtype)
