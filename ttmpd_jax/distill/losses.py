"""Distillation losses: pure functions of logits, weights as arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array,
          temperature: float = 1.0) -> jax.Array:
  """Hinton's temperature-scaled KL(teacher || student), averaged over the batch.

  Args:
    student_logits, teacher_logits: float [B, K].
    temperature: softens both distributions; the loss is scaled by T^2 so gradient magnitudes
      stay comparable across temperatures (Hinton et al. 2015).
  Returns: scalar.
  """
  t = temperature
  teacher_logp = jax.nn.log_softmax(teacher_logits / t, axis=-1)
  student_logp = jax.nn.log_softmax(student_logits / t, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
  return jnp.mean(kl) * t * t


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0,
            kl_weight: float = 1.0, hard_weight: float = 0.0) -> jax.Array:
  """``kl_weight * KD-KL + hard_weight * CE(student, argmax teacher)`` (hard pseudo labels)."""
  loss = kl_weight * kd_kl(student_logits, teacher_logits, temperature)
  if hard_weight:
    pseudo = jnp.argmax(teacher_logits, axis=-1)
    loss = loss + hard_weight * optax.softmax_cross_entropy_with_integer_labels(
        student_logits, pseudo).mean()
  return loss


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy against a soft target distribution ``targets`` [B, K] (rows sum to 1)."""
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))
