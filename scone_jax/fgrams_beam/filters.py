"""Pruning filters over the frequent (n-1)-grams: a pass counts an n-gram only if its
(n-1)-prefix and (n-1)-suffix pass. Approximate is fine (see the package docstring):
'hashes' (sorted 64-bit hashes, practically exact) or 'bloom' (fixed memory)."""
import apache_beam as beam
import numpy as np

PRUNE_FILTERS = ('hashes', 'bloom')
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mix64(h: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer (uint64 arithmetic wraps, which is what we want)."""
  h = (h ^ (h >> np.uint64(30))) * _MIX1
  h = (h ^ (h >> np.uint64(27))) * _MIX2
  return h ^ (h >> np.uint64(31))


def hash_rows(rows_MxK: np.ndarray) -> np.ndarray:
  """64-bit hash of each row of int32 token ids; same value wherever it is computed."""
  seed = (rows_MxK.shape[1] * int(_GOLDEN)) % (1 << 64)  # Python ints: no overflow warning
  h_M = np.full(rows_MxK.shape[0], seed, np.uint64)
  for j in range(rows_MxK.shape[1]):
    h_M = mix64(h_M ^ rows_MxK[:, j].astype(np.uint32).astype(np.uint64)) + _GOLDEN
  return mix64(h_M)


def key_rows(keys_M: np.ndarray, n: int) -> np.ndarray:
  """Keys (void dtype, n int32 LE each) -> their token rows, int32 [M, n]."""
  return np.frombuffer(keys_M.tobytes(), dtype='<i4').reshape(keys_M.size, n)


class HashSetFilter:
  """Sorted unique 64-bit hashes of the frequent keys; false positives only on collision."""

  def __init__(self, hashes: np.ndarray):
    self.hashes = hashes

  def __len__(self):
    return self.hashes.size

  def contains(self, h_M: np.ndarray) -> np.ndarray:
    if not self.hashes.size:
      return np.zeros(h_M.shape, bool)
    idx_M = np.minimum(np.searchsorted(self.hashes, h_M), self.hashes.size - 1)
    return self.hashes[idx_M] == h_M


def bloom_positions(h_M: np.ndarray, num_bits: int, num_hashes: int) -> list[np.ndarray]:
  # Double hashing; num_bits is a power of two so `& mask` is the modulus.
  mask = np.uint64(num_bits - 1)
  step_M = mix64(h_M ^ _MIX2) | np.uint64(1)
  return [(h_M + np.uint64(i) * step_M) & mask for i in range(num_hashes)]


class BloomFilter:
  """Bloom filter over the frequent keys' hashes; fixed memory, some false positives."""

  def __init__(self, bits: np.ndarray, num_hashes: int, num_keys: int):
    self.bits = bits
    self.num_hashes = num_hashes
    self.num_keys = num_keys

  def __len__(self):
    return self.num_keys

  def contains(self, h_M: np.ndarray) -> np.ndarray:
    ok_M = np.ones(h_M.shape, bool)
    for pos_M in bloom_positions(h_M, self.bits.size * 8, self.num_hashes):
      ok_M &= ((self.bits[pos_M >> np.uint64(3)] >> (pos_M & np.uint64(7))) & 1).astype(bool)
    return ok_M


class BuildFilterFn(beam.CombineFn):
  """Frequent (keys, counts) batches of one length -> HashSetFilter | BloomFilter."""

  def __init__(self, n: int, kind: str, bloom_bits_log2: int, bloom_num_hashes: int):
    self._n = n
    self._kind = kind
    self._num_bits = 1 << bloom_bits_log2
    self._num_hashes = bloom_num_hashes

  # Accumulator: [list of sorted hash arrays | Bloom bits (None until needed), num keys].
  def create_accumulator(self):
    return [[] if self._kind == 'hashes' else None, 0]

  def add_input(self, acc, keys_and_counts):
    keys_M, _ = keys_and_counts
    h_M = hash_rows(key_rows(keys_M, self._n))
    acc[1] += keys_M.size
    if self._kind == 'hashes':
      acc[0].append(np.unique(h_M))
      return acc
    if acc[0] is None:
      acc[0] = np.zeros(self._num_bits // 8, np.uint8)
    for pos_M in bloom_positions(h_M, self._num_bits, self._num_hashes):
      np.bitwise_or.at(acc[0], (pos_M >> np.uint64(3)).astype(np.int64),
                       np.uint8(1) << (pos_M & np.uint64(7)).astype(np.uint8))
    return acc

  def compact(self, acc):
    if self._kind == 'hashes' and len(acc[0]) > 1:
      acc[0] = [np.unique(np.concatenate(acc[0]))]
    return acc

  def merge_accumulators(self, accs):
    out = self.create_accumulator()
    for acc in accs:
      out[1] += acc[1]
      if self._kind == 'hashes':
        out[0].extend(acc[0])
      elif acc[0] is not None:
        out[0] = acc[0].copy() if out[0] is None else np.bitwise_or(out[0], acc[0])
    return self.compact(out)

  def extract_output(self, acc):
    acc = self.compact(acc)
    if self._kind == 'hashes':
      return HashSetFilter(acc[0][0] if acc[0] else np.zeros(0, np.uint64))
    bits = acc[0] if acc[0] is not None else np.zeros(self._num_bits // 8, np.uint8)
    return BloomFilter(bits, self._num_hashes, acc[1])
