"""The command line: `python -m scone_jax.fgrams_beam --input=... [Beam options]`."""
import argparse
import json
import logging
import time
from typing import Optional, Sequence

from scone_jax import token_shards
from scone_jax.fgrams_beam.filters import PRUNE_FILTERS
from scone_jax.fgrams_beam.pipeline import run
from scone_jax.fgrams_beam.readers import INPUT_FORMATS


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI: known flags below; every other argument goes to Beam's PipelineOptions."""
  parser = argparse.ArgumentParser(
      allow_abbrev=False,  # never let a Beam option be read as an abbreviation of ours
      description='SCONE f-gram extraction (and token shards) as an Apache Beam pipeline. '
                  'Unknown arguments (e.g. --runner=DataflowRunner) are Beam pipeline '
                  'options.')
  parser.add_argument('--input', action='append', default=[],
                      help='file glob(s); repeat or comma-separate')
  parser.add_argument('--input_format', default='text', choices=INPUT_FORMATS)
  parser.add_argument('--output', default=None,
                      help='FGramSet path (.npz); may be left out with --shards_output')
  parser.add_argument('--max_len', type=int, default=5)
  parser.add_argument('--min_count', type=int, default=2)
  parser.add_argument('--num_fgrams', type=int, default=None, help='required with --output')
  parser.add_argument('--tokenizer', default=None, help="tokenizer: SentencePiece .model or Hugging Face tokenizer.json")
  parser.add_argument('--tokenizer_kind', default='', choices=('', 'sentencepiece', 'huggingface'),
                      help="'' = by the file name (.json: huggingface)")
  for name in ('eos_id', 'bos_id', 'pad_id', 'unk_id'):
    parser.add_argument(f'--tokenizer_{name}', type=int, default=-1,
                        help='special id in the file\'s numbering; -1 = read from the file')
  parser.add_argument('--text_field', default='text',
                      help='text field / column of JSONL, Parquet, Arrow, ArrayRecord input')
  parser.add_argument('--temp_dir', default=None)
  parser.add_argument('--prune_filter', default='hashes', choices=PRUNE_FILTERS)
  parser.add_argument('--bloom_bits_log2', type=int, default=30)
  parser.add_argument('--num_key_shards', type=int, default=256)
  parser.add_argument('--shards_output', default=None,
                      help='also write the training documents as token shards here')
  parser.add_argument('--num_token_shards', type=int, default=16)
  parser.add_argument('--heldout_fraction', type=float, default=0.0,
                      help='drop documents with corpus.heldout_score(id) below this')
  parser.add_argument('--keep_temp', action='store_true')
  args, pipeline_args = parser.parse_known_args(argv)
  # force: importing apache_beam may already have configured the root logger.
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      force=True)
  patterns = [p for arg in args.input for p in arg.split(',') if p]
  t0 = time.time()
  fgram_set = run(input_patterns=patterns, input_format=args.input_format,
                  output_path=args.output, max_len=args.max_len, min_count=args.min_count,
                  num_fgrams=args.num_fgrams, tokenizer_path=args.tokenizer,
                  pipeline_args=pipeline_args, temp_dir=args.temp_dir,
                  prune_filter=args.prune_filter, bloom_bits_log2=args.bloom_bits_log2,
                  num_key_shards=args.num_key_shards, shards_output=args.shards_output,
                  num_token_shards=args.num_token_shards,
                  heldout_fraction=args.heldout_fraction, keep_temp=args.keep_temp,
                  tokenizer_kind=args.tokenizer_kind, text_field=args.text_field,
                  tokenizer_special_ids={n: getattr(args, f'tokenizer_{n}') for n in
                                         ('eos_id', 'bos_id', 'pad_id', 'unk_id')})
  summary = {'output': args.output, 'seconds': round(time.time() - t0, 2)}
  if fgram_set is not None:
    summary.update(num_fgrams=len(fgram_set), fingerprint=fgram_set.fingerprint)
  if args.shards_output:
    index = token_shards.read_index(args.shards_output)
    summary.update(shards_output=args.shards_output, num_docs=index['num_docs'],
                   num_tokens=index['num_tokens'])
  print(json.dumps(summary))


