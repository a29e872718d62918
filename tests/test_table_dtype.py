"""--table_dtype: the f-gram table held as float16 / bfloat16 / int8 (per-row scales).

int8 rows dequantize to within half a scale of the float rows; loading converts shard by
shard (peak memory: the int8 table plus a shard, never the float table beside it); every
table storage gives the same int8 numbers, eval loss and tokens; the table takes about half
of float16's bytes.
"""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from scone_jax import serving
from scone_jax import table as table_lib
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- quantization


def _rows(n, d, seed=0):
  rng = np.random.default_rng(seed)
  # Rows of very different magnitudes: a shared (per-column or global) scale would fail them.
  return (rng.standard_normal((n, d)) * np.exp(rng.uniform(-6, 4, (n, 1)))).astype(np.float32)


def test_int8_rows_are_within_half_a_scale_of_the_float_rows():
  x = _rows(300, 64)
  x[7] = 0.0
  q, s = table_lib.quantize_rows(x)
  assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (300,)
  back = table_lib.dequantize_rows(q, s)
  err = np.abs(back - x)
  # |q * s - x| <= s / 2 per element (plus float32 rounding of the product).
  assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
  np.testing.assert_allclose(s, np.abs(x).max(axis=1) / 127, rtol=1e-6)
  nonzero = np.arange(300) != 7
  assert (np.abs(q[nonzero]).max(axis=1) == 127).all()   # the absmax maps to +-127
  assert (q[7] == 0).all() and s[7] == 0 and (back[7] == 0).all()
  # Each row is quantized on its own: scaling one row changes nothing in the others.
  y = x.copy()
  y[3] *= 1000
  q2, s2 = table_lib.quantize_rows(y)
  others = np.arange(300) != 3
  np.testing.assert_array_equal(q2[others], q[others])
  np.testing.assert_array_equal(s2[others], s[others])


def test_bad_values_get_one_line_errors():
  with pytest.raises(ValueError, match="table_dtype='int4'; use one of float32, bfloat16, "
                                       'float16, int8'):
    table_lib.check_table_dtype('int4')
  with pytest.raises(ValueError, match='load with --table_dtype=int8'):
    table_lib.make_layout(10, 4, 'int8', 4)
  x = _rows(4, 8)
  x[2, 1] = np.inf
  with pytest.raises(ValueError, match='row 2 .*not finite'):
    table_lib.quantize_rows(x)


def _write_table(directory, rows, rows_per_chunk, chunks_per_shard=1):
  """rows as an export's zarr table, with the metadata read_table checks."""
  layout = table_lib.make_layout(rows.shape[0], rows.shape[1], 'float32', rows_per_chunk,
                                 chunks_per_shard)
  store = table_lib.open_table(directory, layout, create=True)
  store.write(rows).result()
  digests = [table_lib.rows_digest(rows[slice(*layout.shard_range(s))])
             for s in range(layout.num_shards)]
  meta = {'layout': layout.to_json(), 'shard_sha256': digests}
  return table_lib.open_table(directory), meta


def test_loading_as_int8_streams_shards_and_never_holds_the_float_table(tmp_path):
  rows = _rows(16384, 128)                      # 8 MiB as float32
  store, meta = _write_table(str(tmp_path / 'table'), rows, rows_per_chunk=512)  # 256 KiB shards
  tracemalloc.start()
  try:
    q, s = table_lib.read_table(store, meta, 'int8', verify=True, what='t')
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  want_q, want_s = table_lib.quantize_rows(rows)
  np.testing.assert_array_equal(q, want_q)
  np.testing.assert_array_equal(s, want_s)
  int8_bytes = q.nbytes + s.nbytes
  assert int8_bytes == 16384 * (128 + 4)
  # The int8 table plus a few shard-sized temporaries; holding the whole float table
  # (8 MiB) beside it would need > 10 MiB.
  assert peak < int8_bytes + 8 * 512 * 128 * 4, (peak, int8_bytes)
  f16, none = table_lib.read_table(store, meta, 'float16', verify=True, what='t')
  assert none is None and f16.dtype == np.float16
  np.testing.assert_array_equal(f16, rows.astype(np.float16))


# ----------------------------------------------------------------------------- on an export


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A tiny SCONE export (float32 table; a few trained steps are not needed: the numbers
  only have to be the model's), and its held-out documents."""
  root = str(tmp_path_factory.mktemp('table_dtype'))
  out, run = tiny.untrained_export(root, num_eval=6, chunks_per_shard=2)  # 200 rows: 4 shards
  return out, run.heldout_docs


def test_int8_table_is_half_of_float16_and_close_to_the_float_rows(export_dir):
  path, _ = export_dir
  f32 = serving.load(path, 'ram')
  f16 = serving.load(path, 'ram', table_dtype='float16')
  i8 = serving.load(path, 'ram', table_dtype='int8')
  assert f32.table.dtype == np.float32 and f16.table.array.dtype == np.float16
  assert i8.table.array.dtype == np.int8 and i8.table.scales.dtype == np.float32
  s, d = i8.table.num_rows, i8.table.dim
  assert i8.table.array.nbytes * 2 == f16.table.array.nbytes
  assert i8.table.nbytes == s * (d + 4) and f16.table.nbytes == s * 2 * d
  ids = np.arange(s)
  want = f32.lookup(ids)
  got = i8.lookup(ids)
  assert got.dtype == np.float32
  scales = i8.table.scales
  assert (np.abs(got - want) <= scales[:, None] / 2 * (1 + 1e-5)).all()
  assert not np.array_equal(got, want)


def test_int8_eval_is_close_to_float16_and_the_same_in_host_memory(export_dir):
  path, docs = export_dir
  f16 = serving.load(path, 'ram', table_dtype='float16').evaluate(docs)
  i8 = serving.load(path, 'ram', table_dtype='int8').evaluate(docs)
  host = serving.load(path, 'host', table_dtype='int8').evaluate(docs)  # gathered in the step
  assert i8['fgram_match_rate'] > 0.2 and i8['tokens'] == f16['tokens']
  assert host['loss'] == i8['loss']
  assert i8['loss'] != f16['loss']
  assert abs(i8['loss'] - f16['loss']) < 2e-3 * f16['loss'], (i8['loss'], f16['loss'])


@pytest.mark.slow
def test_int8_eval_and_generate_agree_under_every_storage(export_dir, tmp_path):
  path, docs = export_dir
  f16_loss = serving.load(path, 'ram', table_dtype='float16').evaluate(docs)['loss']
  prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [10, 11], [12, 13, 14, 12, 13, 14, 12, 13]]
  losses, tokens, nbytes = {}, {}, {}
  for storage in serving.STORAGES:
    gen = serving.load(path, storage, table_dtype='int8', cache_rows=40,
                       mmap_path=str(tmp_path / 'int8.npy') if storage == 'mmap' else None)
    assert gen.table.quantized and gen.table.row_dtype == np.float32, storage
    ev = gen.evaluate(docs)
    assert ev['fgram_match_rate'] > 0.2
    losses[storage] = ev['loss']
    tokens[storage] = gen.generate(prompts, max_new_tokens=6, stop_tokens=())
    nbytes[storage] = gen.table.nbytes
  # The same int8 numbers everywhere: equal losses and tokens.
  assert len(set(losses.values())) == 1, losses
  assert all(t == tokens['ram'] for t in tokens.values()), tokens
  assert len(set(nbytes.values())) == 1
  # Close to float16, and not float16 itself.
  loss = losses['ram']
  assert loss != f16_loss
  assert abs(loss - f16_loss) < 2e-3 * f16_loss, (loss, f16_loss)
  assert os.path.isfile(tmp_path / 'int8.npy') and os.path.isfile(tmp_path / 'int8.scales.npy')


def test_int8_mmap_copy_is_made_beside_the_float_one_and_checked(export_dir, tmp_path):
  path, _ = export_dir
  mm = str(tmp_path / 'copy.npy')
  first = serving.load(path, 'mmap', table_dtype='int8', mmap_path=mm)
  assert json.load(open(mm + '.json'))['dtype'] == 'int8'
  again = serving.load(path, 'mmap', table_dtype='int8', mmap_path=mm)   # reused, verified
  np.testing.assert_array_equal(again.table.array, first.table.array)
  # Asked as another dtype, the copy is rebuilt in that dtype.
  as_f16 = serving.load(path, 'mmap', table_dtype='float16', mmap_path=mm)
  assert as_f16.table.array.dtype == np.float16
  serving.load(path, 'mmap', table_dtype='int8', mmap_path=mm)
  scales = np.load(str(tmp_path / 'copy.scales.npy'), mmap_mode='r+')
  scales[3] *= 2
  scales.flush()
  del scales
  with pytest.raises(ValueError, match='scales do not match'):
    serving.load(path, 'mmap', table_dtype='int8', mmap_path=mm)


@pytest.mark.slow
def test_cli_table_dtype(export_dir, tmp_path):
  path, docs = export_dir
  eval_file = tmp_path / 'eval.txt'
  eval_file.write_text('\n\n'.join(d.text for d in docs) + '\n')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')

  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'scone_jax.main', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)

  bad = cli('--mode=eval', f'--export_dir={path}', f'--eval_text={eval_file}',
            '--table_dtype=int4')
  assert bad.returncode == 2 and bad.stderr.strip().startswith('error:')
  assert 'table_dtype' in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
  out = cli('--mode=eval', f'--export_dir={path}', f'--eval_text={eval_file}',
            '--table_dtype=int8', '--table_storage=host')
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  want = serving.load(path, 'ram', table_dtype='int8').evaluate(docs)
  assert got['tokens'] == want['tokens']
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)


@pytest.mark.slow
def test_serve_with_an_int8_table_answers_as_generate_does(export_dir, tmp_path):
  from test_server import start_server   # pylint: disable=g-import-not-at-top
  path, _ = export_dir
  srv = start_server(path, str(tmp_path / 'server.log'), '--table_dtype=int8')
  try:
    gen = serving.load(path, 'host', table_dtype='int8')
    prompt = 'The nation must protect the public interest'
    ids = gen.tokenizer.encode(prompt).tolist()
    want = [t for t in gen.generate([ids], max_new_tokens=8)[0] if t != gen.tokenizer.eos_id]
    got = srv.client.completions.create(model='export', prompt=prompt, max_tokens=8,
                                        temperature=0)
    assert got.choices[0].text == gen.tokenizer.decode(want)
    assert 'held as int8' in open(srv.log_path).read()
  finally:
    srv.proc.kill()
    srv.proc.wait()
    srv.log.close()
