"""python -m experiments.bench_scale at N = 100k: both stages run, resume, and measure what they say."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scone_jax import export
from scone_jax import fgrams

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(out, *args):
  """Runs the benchmark; (its stdout lines, its last-line JSON)."""
  env = dict(os.environ, PYTHONPATH=_REPO)
  proc = subprocess.run([sys.executable, '-m', 'experiments.bench_scale', f'--out={out}', *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  return lines, json.loads(lines[-1])


def test_rows_todo_cuts_the_shards_rows_into_batches():
  ranges = [(0, 5), (10, 13), (20, 24)]
  todo = export._RowsTodo(ranges)  # pylint: disable=protected-access
  want = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
  assert todo.size == want.size
  got = np.concatenate([todo.ids(i, i + 4) for i in range(0, want.size, 4)])
  np.testing.assert_array_equal(got, want)
  assert todo.ids(want.size, want.size + 4).size == 0
  assert export._RowsTodo([]).size == 0  # pylint: disable=protected-access


@pytest.mark.slow
def test_stage1_small_set_matcher_and_resume(tmp_path):
  out = tmp_path / 'bench'
  args = ['--stages=1', '--sizes=100000', '--stream_tokens=1000000', '--decode_steps=1000']
  _, r = _bench(out, *args)
  build = r['fgram_sets']['100k']['build']
  match = r['fgram_sets']['100k']['load_match']
  assert r['matcher_fgrams'] == 100000 and sum(build['length_counts']) == 100000
  assert r['matcher_tokens_per_s'] > 0 and r['matcher_advance_tokens_per_s'] > 0
  # The stream is half f-grams; the decode-time matcher sees the same stream.
  assert 0.2 < match['match_rate'] < 0.9
  assert abs(match['advance_match_rate'] - match['match_rate']) < 0.1
  assert match['matcher_entries'] >= 100000
  # Every saved f-gram, matched as its own document, is found with its id.
  fs = fgrams.FGramSet.load(out / 'sets' / 'fgrams_100000.npz')
  assert fs.fingerprint == build['fingerprint']
  inside = np.arange(fs.max_len)[None, :] < fs.lengths[:, None]
  offsets = np.concatenate([[0], np.cumsum(fs.lengths)])
  ids, lens = fs.match_flat(fs.tokens_padded[inside], offsets)
  np.testing.assert_array_equal(ids[offsets[1:] - 1], np.arange(len(fs)))
  np.testing.assert_array_equal(lens[offsets[1:] - 1], fs.lengths)
  # A second run finds both units done and reports the same numbers.
  lines, again = _bench(out, *args)
  assert sum('skipped' in line for line in lines) == 2
  assert again['fgram_sets'] == r['fgram_sets']


@pytest.mark.slow
def test_stage2_small_export_killed_and_resumed(tmp_path):
  _, r = _bench(tmp_path / 'bench', '--stages=2', '--export_rows=100000',
                '--chunks_per_shard=2')
  e = r['exports']['100k']
  assert e['rows'] == e['rows_computed'] == 100000 and e['dtype'] == 'float16'
  assert r['export_rows_per_s'] > 0 and r['export_peak_rss_mb_100k'] > 0
  assert 0 < r['export_fraction_of_flop_bound']
  k = r['kill_resume']
  assert k['shards'] == e['num_shards'] > 2
  assert 1 <= k['shards_recorded_at_kill'] < k['shards']
  assert k['shards_recomputed'] <= 1
  assert k['same_checksums'] and k['table_sha256'] == e['table_sha256']
  # Stage 3 serves that export from disk, cold and warm, concurrent and sequential lookups.
  _, r3 = _bench(tmp_path / 'bench', '--stages=3', '--export_rows=100000',
                 '--storages=mmap', '--batches=2', '--rounds=1', '--new_tokens=4')
  s = r3['serving']
  for cache in ('cold', 'warm'):
    for mode in ('', '_sequential'):
      key = f'decode_mmap_{cache}_b2{mode}'
      assert s[key + '_tokens_per_s'] > 0 and s[key + '_ratio'] > 0
      assert 0 < s[key + '_lookup_p50_ms'] <= s[key + '_lookup_p99_ms']
      assert s[key + '_lookup_steps'] == 3  # 4 new tokens: the prefill's + 3 decode steps
      assert 0 <= s[key + '_lookup_rows_per_step'] <= 2
      direct = f'lookup_mmap_{cache}_b2{mode}'
      assert 0 < s[direct + '_p50_ms'] <= s[direct + '_p99_ms']
  assert r3['serve_table_content'] == 'real'
  assert s['serve_mmap_rss_anon_max_mb'] > 0 and s['serve_mmap_rss_file_max_mb'] > 0
  # A synthetic export of 150k rows in the same format (from that export and stage 1's set
  # of 150k f-grams), served through tensorstore; a second run finds it built.
  args = ['--stages=3', '--export_rows=100000', '--serve_rows=150000',
          '--serve_table=synthetic', '--storages=tensorstore', '--batches=2', '--rounds=1',
          '--new_tokens=4']
  _, r4 = _bench(tmp_path / 'bench', *args)
  built = r4['synthetic_table']
  assert built['rows'] == 150000 and not built['skipped'] and built['write_mb_per_s'] > 0
  assert r4['serve_table_content'] == 'synthetic' and r4['serving_rows'] == 150000
  s = r4['serving']
  assert s['serve_tensorstore_tensorstore_cache_bytes'] > 0
  for cache in ('cold', 'warm'):
    assert s[f'decode_tensorstore_{cache}_b2_lookup_p99_ms'] > 0
  meta = json.loads((tmp_path / 'bench' / 'stage3' / 'synthetic_150000' / 'export' /
                     'export.json').read_text())
  assert meta['synthetic_table']['content'] == 'synthetic-v1' and meta['num_fgrams'] == 150000
  lines, _ = _bench(tmp_path / 'bench', *args)
  assert any('synthetic_table_150000: done in an earlier run' in line for line in lines)
  # A second, smaller export served beside the first in one process (--pair_rows): same
  # prompts, interleaved rounds, each size's ratio and the per-round big / small tokens/s.
  _bench(tmp_path / 'bench', '--stages=2', '--export_rows=50000,100000', '--kill_rows=0')
  _, r5 = _bench(tmp_path / 'bench', '--stages=3', '--export_rows=50000,100000',
                 '--pair_rows=50000,100000', '--pair_batches=2', '--storages=mmap',
                 '--batches=2', '--rounds=2', '--new_tokens=4')
  pair = r5['serve_pair']
  assert pair['pair_sizes'] == [50000, 100000]
  for cache in ('cold', 'warm'):
    key = f'pair_mmap_{cache}_b2'
    for tag in ('50k', '100k'):
      assert pair[f'{key}_{tag}_tokens_per_s'] > 0 and pair[f'{key}_{tag}_ratio'] > 0
      assert 0 < pair[f'{key}_{tag}_lookup_p50_ms'] <= pair[f'{key}_{tag}_lookup_p99_ms']
    got = pair[key + '_big_over_small']
    assert pair[key + '_big_over_small_min'] <= got <= pair[key + '_big_over_small_max']
  # The step's matcher arrays: ~39 B per f-gram whatever the size.
  assert 30 < pair['pair_matcher_bytes_per_fgram'] < 50
  assert pair['pair_matcher_bytes_100k'] > pair['pair_matcher_bytes_50k']


def test_stage4_projects_from_the_measured_inputs():
  from experiments import bench_scale as bench  # pylint: disable=g-import-not-at-top
  measured = {'fgram_sets': {'10m': {'build': {'array_bytes': 320_000_000},
                                     'load_match': {'matcher_bytes_per_fgram': 100.0,
                                                    'matcher_build_s': 30.0}}},
              'matcher_fgrams': 10_000_000, 'matmul': {'matmul_gflops': 60.0},
              'export_fraction_of_flop_bound': 0.5}
  p = bench.stage4(measured)['projection_1b']
  assert p['table_bytes_float16'] == 10**9 * 2048 * 2
  assert p['table_bytes_int8'] == 10**9 * (2048 + 4)
  assert p['matcher_host_ram_bytes'] == 100.0 * 10**9
  assert p['matcher_build_s'] == 30.0 * 100
  hours = p['export_hours']
  assert hours['1'] == pytest.approx(4 * hours['4'])
  # Half the fraction of the FLOP bound: twice the hours.
  slower = bench.stage4(dict(measured, export_fraction_of_flop_bound=0.25))['projection_1b']
  assert slower['export_hours']['1'] == pytest.approx(2 * hours['1'])
  assert p['lookup_ms_per_token_b16'] == {'cold': None, 'warm': None}
  # With stage 3 at batch 16: its lookup p50 per step over the 16 tokens of a step.
  served = dict(measured, serving_rows=10**8, serve_table_content='synthetic', serving={
      'decode_mmap_cold_b16_lookup_p50_ms': 1.6, 'decode_mmap_cold_b16_lookup_p99_ms': 3.2,
      'decode_mmap_warm_b16_lookup_p50_ms': 0.08, 'decode_mmap_warm_b16_lookup_p99_ms': 0.16})
  p = bench.stage4(served)['projection_1b']
  assert p['lookup_ms_per_token_b16'] == pytest.approx({'cold': 0.1, 'warm': 0.005})
  assert p['lookup_b16']['storage'] == 'mmap' and p['lookup_b16']['cold_step_p99_ms'] == 3.2
  assert 'decode_mmap_cold_b16_lookup' in p['lookup_b16']['measured_input']
  # The direct lookups (16 matched rows a step) come first where stage 3 measured them.
  served['serving'].update({'lookup_mmap_cold_b16_p50_ms': 3.2, 'lookup_mmap_cold_b16_p99_ms': 6.4,
                            'lookup_mmap_warm_b16_p50_ms': 0.16,
                            'lookup_mmap_warm_b16_p99_ms': 0.32})
  p = bench.stage4(served)['projection_1b']
  assert p['lookup_ms_per_token_b16'] == pytest.approx({'cold': 0.2, 'warm': 0.01})
  assert p['lookup_b16']['measured_input'].startswith('lookup_mmap_cold_b16')
  # With stage 3's pair run: serving's host memory per f-gram, scaled to 1B.
  paired = dict(measured, serve_pair={'pair_sizes': [10**7, 10**8],
                                      'pair_matcher_bytes_per_fgram': 38.6,
                                      'pair_rss_anon_bytes_per_fgram': 46.0})
  p = bench.stage4(paired)['projection_1b']
  assert p['serving_matcher_host_ram_bytes'] == pytest.approx(38.6e9)
  assert p['serving_anon_ram_bytes'] == pytest.approx(46e9)
  assert any('100m f-grams (stage 3 pair)' in m for m in p['measured'])
  assert 'serving_matcher_host_ram_bytes' not in bench.stage4(measured)['projection_1b']
  # Without stage 2 the export figures are absent, not guessed.
  assert 'export_hours' not in bench.stage4({'fgram_sets': measured['fgram_sets'],
                                             'matcher_fgrams': 10_000_000})['projection_1b']


def test_synthetic_rows_are_finite_distinct_and_reproducible():
  from experiments import scale_table  # pylint: disable=g-import-not-at-top
  from scone_jax import table as table_lib  # pylint: disable=g-import-not-at-top
  for dtype in (np.float16, np.float32, table_lib.np_dtype('bfloat16')):
    block = scale_table.random_block(16, np.dtype(dtype))
    rows = scale_table.synthetic_rows(block, 4000, 9000, np.dtype(dtype))
    assert rows.dtype == dtype and rows.shape == (5000, 16)
    assert np.isfinite(rows.astype(np.float32)).all()
    # Rows 4096 apart share their block row but not their bits.
    assert not np.array_equal(rows[0], rows[4096])
    again = scale_table.synthetic_rows(block, 4100, 4200, np.dtype(dtype))
    np.testing.assert_array_equal(again, rows[100:200])
