"""What training-eval and serving-eval both compute: masked NLL, loss, perplexity, bits/byte.

One function each, so a checkpoint evaluated in training and its export evaluated in
serving report through the same arithmetic.
"""
import math

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV, targets_BxL):
  """Negative log-likelihood of each target, float32 [B, L] (softmax cross-entropy)."""
  logits = logits_BxLxV.astype(jnp.float32)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  label_logits = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.log(jnp.sum(jnp.exp(logits), axis=-1)) - label_logits


def masked_nll_sum(logits_BxLxV, targets_BxL, loss_mask_BxL):
  """(sum of NLL over positions with loss_mask > 0, number of those positions), float32."""
  mask_BxL = loss_mask_BxL.astype(jnp.float32)
  return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * mask_BxL), jnp.sum(mask_BxL)


def eval_metrics(nll_sum: float, tokens: float, batches: int, loader) -> dict:
  """The eval JSON from summed NLL and token count over a loader's batches.

  Bits per byte use the bytes per token of the loader's whole split (`num_bytes`,
  `num_tokens`), so a partial eval (max_batches) still reports it.
  """
  loss = nll_sum / max(tokens, 1.0)
  bytes_per_token = loader.num_bytes / max(loader.num_tokens, 1)
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)),
          'bits_per_byte': loss / math.log(2) / max(bytes_per_token, 1e-9),
          'tokens': int(tokens), 'batches': batches}
