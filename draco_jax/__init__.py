"""draco-jax: DRACO (Chen et al., ICML 2018) and Byzantine-robust aggregation in JAX.

Core API (see README and docs/math.md):
  make_code / encode        -- gradient codes (repetition, cyclic, cyclic_paper, uncoded)
  make_decoder              -- exact DRACO decoders, ``decoder(received_PxD, key)``
  make_aggregator           -- baseline robust aggregators with the same contract
  make_attack               -- adversaries as pure functions ``attack(key, sent_PxD, mask_P)``
"""

from draco_jax.coding import CODES, Code, encode, encode_rows, make_code, plain_mean
from draco_jax.contract import Report
from draco_jax.decode import make_decoder

__all__ = [
  "CODES",
  "Code",
  "Report",
  "encode",
  "encode_rows",
  "make_code",
  "make_decoder",
  "plain_mean",
]
