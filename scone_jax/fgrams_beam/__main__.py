"""`python -m scone_jax.fgrams_beam`: the DoFns live in the package's modules (importable
by workers as scone_jax.fgrams_beam.*), not in this __main__."""
from scone_jax.fgrams_beam import cli

if __name__ == '__main__':
  cli.main()
