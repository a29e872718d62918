"""The numba kernels of the f-gram package: hashing, the match table, matching, counting.

Nothing here validates its inputs; `fgram_set.py` and `extraction.py` do, then call these.

The match table is an exact open-addressing hash table holding every f-gram and every proper
suffix of length >= 2 of every f-gram (a "marker", id -1 unless it is itself an f-gram). A
slot is one aligned 32- or 64-byte row `[length, id, tokens...]` (length 0 = empty), so a
probe touches one cache line. The n-gram ending at position i is hashed from its last token
backwards, so probes for n = 2, 3, ... extend one hash and stop at the first miss (no longer
f-gram can end there), and the slots for upcoming positions are prefetched so that cache
misses overlap. The table arrays (`flat`, `width`, `shift`) are `FGramSet.table`'s fields.
`match_flat_sampled` is the same search with two hashed tests on each f-gram found (training
remedies, `sampling.py`).

Counting (extraction) sorts exact integer n-gram codes with an LSD radix sort and scans the
runs of equal codes.
"""
from llvmlite import ir
import numba
from numba import types as nb_types
from numba.core import cgutils
from numba.extending import intrinsic
import numpy as np

# How many positions ahead the matcher prefetches its first hash slots.
_PREFETCH_DISTANCE = 16

@intrinsic
def _prefetch(typingctx, arr, idx):  # pylint: disable=unused-argument
  """Emits llvm.prefetch(&arr[idx]) (read, keep in all cache levels); never faults."""
  if not isinstance(arr, nb_types.Array) or arr.ndim != 1:
    return None
  sig = nb_types.void(arr, idx)

  def codegen(context, builder, signature, args):
    aryty, idxty = signature.args
    ary = context.make_array(aryty)(context, builder, args[0])
    i = context.cast(builder, args[1], idxty, nb_types.intp)
    ptr = builder.gep(ary.data, [i])
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    addr = builder.bitcast(ptr, i8p)
    # The intrinsic's mangled name depends on whether this LLVM has opaque pointers.
    name = 'llvm.prefetch.p0' if str(addr.type) == 'ptr' else 'llvm.prefetch.p0i8'
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [addr, i32(0), i32(3), i32(1)])
    return context.get_dummy_value()

  return sig, codegen


# ---------------------------------------------------------------------------
# Hashing and the match table

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_C0 = np.uint64(0x632BE59BD9B4E019)
_S29 = np.uint64(29)
_S31 = np.uint64(31)


@numba.njit(inline='always')
def _hash_first(t):
  h = (np.uint64(t) ^ _C0) * _M1
  return h ^ (h >> _S31)


@numba.njit(inline='always')
def _hash_step(h, t):
  # The n-gram ending at i is hashed from its last token backwards, so the hash of the
  # (n+1)-gram extends that of the n-gram by one step.
  h = (h ^ np.uint64(t)) * _M1
  return h ^ (h >> _S29)


@numba.njit(inline='always')
def _hash_slot(h, shift):
  return np.intp((h * _M2) >> shift)


# ---------------------------------------------------------------------------
# Counting (extraction)


@numba.njit(cache=True, nogil=True)
def count_tokens(tok, num_values):
  counts = np.zeros(num_values, np.int64)
  for i in range(tok.size):
    t = tok[i]
    if t >= 0:
      counts[t] += 1
  return counts


@numba.njit(cache=True, nogil=True)
def densify_lut(tok, lut):
  for i in range(tok.size):
    t = tok[i]
    if t >= 0:
      tok[i] = lut[t]


@numba.njit(cache=True, nogil=True)
def densify_search(tok, vocab):
  v = vocab.size
  for i in range(tok.size):
    t = tok[i]
    if t >= 0:
      j = np.searchsorted(vocab, t)
      tok[i] = j if (j < v and vocab[j] == t) else -1


@numba.njit(cache=True, nogil=True)
def count_candidates(prev):
  c = 0
  for i in range(prev.size - 1):
    if prev[i] >= 0 and prev[i + 1] >= 0:
      c += 1
  return c


@numba.njit(cache=True, nogil=True)
def fill_candidates(prev, tok1, n, num_tokens, keys, pos, with_pos):
  # The (n-1)-gram at i+1 being frequent implies tokens i+1..i+n-1 are frequent tokens of
  # the same document, so tok1[i+n-1] is valid.
  v = np.uint64(num_tokens)
  c = 0
  for i in range(prev.size - 1):
    if prev[i] >= 0 and prev[i + 1] >= 0:
      keys[c] = np.uint64(prev[i]) * v + np.uint64(tok1[i + n - 1])
      if with_pos:
        pos[c] = i
      c += 1


@numba.njit(cache=True, nogil=True)
def radix_sort(keys, vals, nbits, with_vals):
  """LSD radix sort of keys (carrying vals when with_vals); returns the sorted arrays."""
  n = keys.size
  npass = max(1, (nbits + 10) // 11)
  dbits = max(1, (nbits + npass - 1) // npass)
  nbuckets = 1 << dbits
  mask = np.uint64(nbuckets - 1)
  hist = np.zeros((npass, nbuckets), np.int64)
  for i in range(n):
    k = np.uint64(keys[i])
    for p in range(npass):
      hist[p, np.intp((k >> np.uint64(p * dbits)) & mask)] += 1
  src_k = keys
  src_v = vals
  dst_k = np.empty_like(keys)
  dst_v = np.empty_like(vals)
  offsets = np.empty(nbuckets, np.int64)
  for p in range(npass):
    s = 0
    skip = False
    for b in range(nbuckets):
      if hist[p, b] == n:
        skip = True
      offsets[b] = s
      s += hist[p, b]
    if skip:  # every key has the same digit here
      continue
    sh = np.uint64(p * dbits)
    for i in range(n):
      k = src_k[i]
      b = np.intp((np.uint64(k) >> sh) & mask)
      j = offsets[b]
      offsets[b] = j + 1
      dst_k[j] = k
      if with_vals:
        dst_v[j] = src_v[i]
    src_k, dst_k = dst_k, src_k
    src_v, dst_v = dst_v, src_v
  return src_k, src_v


@numba.njit(inline='always')
def _run_end(keys, i):
  """The end of the run of keys equal to keys[i] (keys sorted)."""
  j = i + 1
  while j < keys.size and keys[j] == keys[i]:
    j += 1
  return j


@numba.njit(cache=True, nogil=True)
def scan_runs(keys, pos, min_count, ids, write_ids):
  """Frequent runs of equal sorted keys -> (keys, counts); ids[pos] = run rank if asked."""
  m = keys.size
  # Two scans (count, then fill) so the outputs are allocated at their exact size.
  num_frequent = 0
  i = 0
  while i < m:
    j = _run_end(keys, i)
    if j - i >= min_count:
      num_frequent += 1
    i = j
  fkeys = np.empty(num_frequent, np.uint64)
  fcounts = np.empty(num_frequent, np.int64)
  g = 0
  i = 0
  while i < m:
    j = _run_end(keys, i)
    if j - i >= min_count:
      fkeys[g] = keys[i]
      fcounts[g] = j - i
      if write_ids:
        for t in range(i, j):
          ids[pos[t]] = g
      g += 1
    i = j
  return fkeys, fcounts


# ---------------------------------------------------------------------------
# The match table and matching


@numba.njit(inline='always')
def length_bound(length):
  """The most entries one f-gram adds: itself and its proper suffixes of length >= 2."""
  return length - 1


@numba.njit(cache=True, nogil=True)
def insert_fgrams(tokens_padded, lengths, table, width, shift, max_entries):
  """Inserts every f-gram and its suffixes; returns (#entries, duplicate id or -1), or
  (#entries, -2) as soon as the table would hold more than max_entries (build it bigger)."""
  nslots = table.size // width
  mask = nslots - 1
  entries = 0
  for f in range(lengths.size):
    if entries + length_bound(lengths[f]) > max_entries:
      return entries, -2
    length = lengths[f]
    h = _hash_first(tokens_padded[f, length - 1])
    for m in range(2, length + 1):
      first = length - m
      h = _hash_step(h, tokens_padded[f, first])
      s = _hash_slot(h, shift)
      while True:
        base = s * width
        cur = table[base]
        if cur == 0:
          table[base] = m
          table[base + 1] = f if m == length else -1
          for k in range(m):
            table[base + 2 + k] = tokens_padded[f, first + k]
          entries += 1
          break
        if cur == m:
          eq = True
          for k in range(m):
            if table[base + 2 + k] != tokens_padded[f, first + k]:
              eq = False
              break
          if eq:
            if m == length:
              if table[base + 1] >= 0:
                return entries, f
              table[base + 1] = f
            break
        s = (s + 1) & mask
  return entries, -1


@numba.njit(inline='always')
def _probe(tokens, i, n, h, table, width, shift):
  """The slot of the n-gram tokens[i-n+1..i] (hash h): its id (-1: a marker, a suffix of
  longer f-grams only), or -2 when it is not in the table (no longer f-gram ends at i).

  The probe of `_longest_ending_at`, for the sampled search; `_longest_ending_at` keeps its
  own copy: written with this helper, match_flat measured 3-9% slower (3 runs).
  """
  mask = (table.size // width) - 1
  s = _hash_slot(h, shift)
  while True:
    base = s * width
    cur = table[base]
    if cur == 0:
      return -2
    if cur == n:
      eq = True
      for k in range(n):
        if table[base + 2 + k] != tokens[i - n + 1 + k]:
          eq = False
          break
      if eq:
        return table[base + 1]
    s = (s + 1) & mask


@numba.njit(inline='always')
def _longest_ending_at(tokens, i, lim, table, width, shift):
  """(id, length) of the longest f-gram ending at tokens[i] using tokens[i-lim+1..i]."""
  mask = (table.size // width) - 1
  best_id = -1
  best_len = 1
  h = _hash_first(tokens[i])
  for n in range(2, lim + 1):
    h = _hash_step(h, tokens[i - n + 1])
    s = _hash_slot(h, shift)
    found = -2
    while True:
      base = s * width
      cur = table[base]
      if cur == 0:
        break
      if cur == n:
        eq = True
        for k in range(n):
          if table[base + 2 + k] != tokens[i - n + 1 + k]:
            eq = False
            break
        if eq:
          found = table[base + 1]
          break
      s = (s + 1) & mask
    if found == -2:  # no suffix of this length: no longer f-gram can end at i
      break
    if found >= 0:
      best_id = found
      best_len = n
  return best_id, best_len


@numba.njit(inline='always')
def _prefetch_ahead(tokens, i, table, width, shift):
  # Prefetch the 2- and 3-gram slots of a position ahead so their misses overlap with this
  # position's work (ignoring document boundaries: a useless prefetch is harmless).
  j = i + _PREFETCH_DISTANCE
  if j < tokens.size and j >= 2:
    h = _hash_step(_hash_first(tokens[j]), tokens[j - 1])
    _prefetch(table, _hash_slot(h, shift) * width)
    h = _hash_step(h, tokens[j - 2])
    _prefetch(table, _hash_slot(h, shift) * width)


@numba.njit(cache=True, nogil=True)
def match_flat(tokens, offsets, table, width, shift, max_len, ids, lens):
  total = tokens.size
  dist = _PREFETCH_DISTANCE
  for d in range(offsets.size - 1):
    start = offsets[d]
    end = offsets[d + 1]
    for i in range(start, end):
      # Prefetch the 2- and 3-gram slots of a position ahead so their misses overlap with
      # this position's work (ignoring document boundaries: a useless prefetch is harmless).
      j = i + dist
      if j < total and j >= 2:
        h = _hash_step(_hash_first(tokens[j]), tokens[j - 1])
        _prefetch(table, _hash_slot(h, shift) * width)
        h = _hash_step(h, tokens[j - 2])
        _prefetch(table, _hash_slot(h, shift) * width)
      lim = min(max_len, i - start + 1)
      fid, flen = _longest_ending_at(tokens, i, lim, table, width, shift)
      ids[i] = fid
      lens[i] = flen


# ---------------------------------------------------------------------------
# Sampled matching (training only: `fgrams.sampling`)

_MIX_A = np.uint64(0xBF58476D1CE4E5B9)
_MIX_B = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S11 = np.uint64(11)
# Salts that make the seed's, the subset's and the drops' random streams independent.
_SALT_SEED = np.uint64(0x243F6A8885A308D3)
_SALT_KEEP = np.uint64(0x6A09E667F3BCC908)
_SALT_DROP = np.uint64(0xBB67AE8584CAA73B)


@numba.njit(inline='always')
def _mix(x):
  """splitmix64's finaliser: a well-mixed 64-bit function of x."""
  x = (x ^ (x >> _S30)) * _MIX_A
  x = (x ^ (x >> _S27)) * _MIX_B
  return x ^ (x >> _S31)


@numba.njit(inline='always')
def _segment_hashes(seed, key):
  """The hashes a segment's subset and its drops are drawn from: of (seed, key) only."""
  row_h = _mix(_mix(seed ^ _SALT_SEED) ^ _mix(key))
  return _mix(row_h ^ _SALT_KEEP), _mix(row_h ^ _SALT_DROP)


@numba.njit(inline='always')
def _active(fid, keep_h, keep_below):
  # Uniforms are the top 53 bits, so keep_below = 2^53 keeps every f-gram.
  return (_mix(keep_h ^ (np.uint64(fid) * _M1)) >> _S11) < keep_below


@numba.njit(inline='always')
def _dropped(fid, pos_h, drop_below):
  return (_mix(pos_h ^ (np.uint64(fid) * _M1)) >> _S11) < drop_below


@numba.njit(cache=True, nogil=True)
def subset_active(keys, num_fgrams, seed, keep_below, out_DxS):
  """out_DxS[d, f] = whether f-gram f is in segment d's subset (`match_flat_sampled`)."""
  for d in range(keys.size):
    keep_h, _ = _segment_hashes(seed, np.uint64(keys[d]))
    for f in range(num_fgrams):
      out_DxS[d, f] = _active(f, keep_h, keep_below)


@numba.njit(cache=True, nogil=True)
def match_flat_sampled(tokens, offsets, keys, seed, keep_below, drop_below, table, width,
                       shift, max_len, ids, lens):
  """`match_flat` taking, at each position, the longest f-gram ending there that is active in
  the segment's subset (`_active`: keyed by seed, keys[d] and the id) and not dropped at
  this position (`_dropped`: keyed by seed, keys[d], the position in the segment and the
  id). Walking up the lengths and keeping the last such f-gram is the longest active one,
  dropped to the next shorter active one with probability drop_below / 2^53, repeatedly,
  since each drop test is independent. keep_below = 2^53 and drop_below = 0: `match_flat`."""
  for d in range(offsets.size - 1):
    start = offsets[d]
    end = offsets[d + 1]
    keep_h, drop_h = _segment_hashes(seed, np.uint64(keys[d]))
    for i in range(start, end):
      _prefetch_ahead(tokens, i, table, width, shift)
      pos_h = _mix(drop_h ^ (np.uint64(i - start) * _M2))
      lim = min(max_len, i - start + 1)
      best_id = -1
      best_len = 1
      h = _hash_first(tokens[i])
      for n in range(2, lim + 1):
        h = _hash_step(h, tokens[i - n + 1])
        found = _probe(tokens, i, n, h, table, width, shift)
        if found == -2:
          break
        if (found >= 0 and _active(found, keep_h, keep_below) and
            not _dropped(found, pos_h, drop_below)):
          best_id = found
          best_len = n
      ids[i] = best_id
      lens[i] = best_len


@numba.njit(cache=True, nogil=True)
def match_last(context, table, width, shift, max_len):
  n = context.size
  if n == 0:
    return -1, 1
  return _longest_ending_at(context, n - 1, min(max_len, n), table, width, shift)


@numba.njit(cache=True, nogil=True)
def match_last_batch(context_bxk, valid_b, table, width, shift, max_len, ids, lens):
  cols = context_bxk.shape[1]
  for b in range(context_bxk.shape[0]):
    valid = min(valid_b[b], cols)
    if valid <= 0:
      ids[b] = -1
      lens[b] = 1
      continue
    row = context_bxk[b]
    fid, flen = _longest_ending_at(row, cols - 1, min(max_len, valid), table, width, shift)
    ids[b] = fid
    lens[b] = flen


# ---------------------------------------------------------------------------
# Decoding


# Numba's on-disk cache is safe here: it is invalidated when this file changes, and every
# helper this kernel inlines lives in this file.
@numba.njit(cache=True, nogil=True)
def advance_matches(state_BxC, new_B, flat, width, shift, max_len, rows_SxW, out_BxW,
                    ints_Bx4):
  """One decode step on the host for every row: push the new token, match, gather.

  The incremental form of `FGramSet.match`: fed a document one token at a time, a row
  yields the ids `match` gives for that document (tests/test_fgrams.py checks it).

  Args:
    state_BxC: int64 [B, K + 2], updated in place: each row's last K tokens of the current
      document (right-aligned), how many tokens the document has so far, and the position
      the new token takes; K >= max_len. A row whose length is 0 starts a document (the
      tokens left in it are not used).
    new_B: the new token of each row.
    flat, width, shift: the match table (`FGramSet.table`'s fields).
    max_len: the set's max_len; 0 matches nothing.
    rows_SxW: one row per f-gram id to gather (any item type numba copies, e.g. the
      table's rows viewed as unsigned ints); no gather when it has no rows.
    out_BxW: gets the gathered row of each matched row; unmatched rows are left as they are.
    ints_Bx4: int32, gets (token, position, f-gram id or -1, valid=1) per row.

  Three passes so that the cache misses of different rows overlap: prefetch the hash
  slots, match and prefetch the rows, copy the rows.
  """
  num_rows, cols = state_BxC.shape
  k = cols - 2
  dim = rows_SxW.shape[1]
  gather = rows_SxW.shape[0] > 0
  rows_flat = rows_SxW.reshape(-1)
  line = max(1, 64 // rows_SxW.itemsize)  # elements per cache line
  for b in range(num_rows):
    for j in range(k - 1):
      state_BxC[b, j] = state_BxC[b, j + 1]
    state_BxC[b, k - 1] = new_B[b]
    state_BxC[b, k] += 1
    if max_len > 0:
      lim = min(max_len, min(state_BxC[b, k], k))
      h = _hash_first(state_BxC[b, k - 1])
      for n in range(2, lim + 1):
        h = _hash_step(h, state_BxC[b, k - n])
        _prefetch(flat, _hash_slot(h, shift) * width)
  for b in range(num_rows):
    fid = -1
    if max_len > 0:
      lim = min(max_len, min(state_BxC[b, k], k))
      fid, _ = _longest_ending_at(state_BxC[b, :k], k - 1, lim, flat, width, shift)
    ints_Bx4[b, 0] = new_B[b]
    ints_Bx4[b, 1] = state_BxC[b, k + 1]
    ints_Bx4[b, 2] = fid
    ints_Bx4[b, 3] = 1
    state_BxC[b, k + 1] += 1
    if gather and fid >= 0:
      for j in range(0, dim, line):
        _prefetch(rows_flat, fid * dim + j)
  if gather:
    for b in range(num_rows):
      fid = ints_Bx4[b, 2]
      if fid >= 0:
        out_BxW[b, :] = rows_SxW[fid, :]
