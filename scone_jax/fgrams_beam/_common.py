"""What every stage of the pipeline shares: the metrics namespace and worker-side file IO.

Code that runs on workers reads and writes through Beam's `FileSystems`, the IO layer every
runner's workers have (the launching process uses `scone_jax.paths`).
"""
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

METRICS_NAMESPACE = 'fgrams_beam'


def read_file(path: str, mime_type: str = 'application/octet-stream') -> bytes:
  with FileSystems.open(path, mime_type=mime_type,
                        compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def write_file(path: str, data: bytes, mime_type: str = 'application/octet-stream') -> None:
  """Writes `data` to `path` whole; callers pick deterministic names, so a retried bundle
  rewrites the same file instead of adding a duplicate."""
  with FileSystems.create(path, mime_type=mime_type,
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)
