"""scone_jax: SCONE (arXiv 2502.01637) in JAX/Flax.

Data flows one way: fgrams → data → model/train → export → serving.
"""
__version__ = '0.1.0'
