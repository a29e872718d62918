"""F-gram extraction beyond one machine: the K-1 pass algorithm as an Apache Beam pipeline
(and, from the same pass over the text, the training split's token shards).

The result is the FGramSet `fgrams.extract` builds in process (same n-grams in the same
order, same counts, same fingerprint); only where the counting runs differs. DirectRunner
by default (Beam 2.77's DirectRunner first tries Prism, fetching its binary from GitHub;
offline, `--runner=FnApiRunner` runs the same in process); any runner through standard
Beam options. Arguments the script does not know go to Beam unchanged. Workers must be
able to import `scone_jax` (the DoFns live in this package) and must reach the inputs, the
tokenizer and the shard directory (`--temp_dir`, else `--temp_location`): the launcher
makes a local temporary one only for runners whose workers share this machine's disk.
Paths on gs:// need Beam's GCS filesystem on the launcher and on the workers
(`pip install "apache-beam[gcp]"`; the project's own IO layer has gcsfs already).

The package, one module per concern, in the order a run uses them:
  readers.py     input files -> (id, text) documents (or token documents)
  tokenizing.py  drop held-out documents, tokenize the rest
  shards.py      tokenized documents -> token shards (bytes built by token_shards)
  filters.py     the pruning filters over frequent (n-1)-grams
  counting.py    the K-1 counting passes and the per-batch top-S files
  pipeline.py    `run`: check, set up the runner, build and run, finish on the launcher
  cli.py         the command line (`python -m scone_jax.fgrams_beam`)

  Dataflow  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
            (shards go there too) --setup_file=./pyproject.toml (workers pip-install
            scone_jax with its core dependencies at start-up; or bake them into an image
            and pass --sdk_container_image=REGION-docker.pkg.dev/P/REPO/IMAGE:TAG).
            --worker_machine_type=n2-highmem-8: a worker holds the pruning filter
            (~0.8 GB per 100M frequent (n-1)-grams with 'hashes', fixed with 'bloom') and
            one key shard's distinct candidates; --max_num_workers bounds the autoscaler.
  Flink     --runner=FlinkRunner --flink_master=HOST:8081 --temp_dir=gs://B/tmp (or a
            path every task manager mounts) --parallelism=N. The Python code runs in an
            SDK harness per task manager: --environment_type=DOCKER (default; the
            task managers need Docker and an image with scone_jax installed, named by
            --sdk_container_image), PROCESS (--environment_config='{"command":
            "/path/to/boot"}', scone_jax installed on every task manager), or LOOPBACK
            (the harness is this launching process: a local Flink for tests, no
            parallel Python work). Beam starts a Flink job server from a jar it downloads
            for the cluster's --flink_version (offline: --flink_job_server_jar=PATH).
  Spark     --runner=SparkRunner --spark_master_url=spark://HOST:7077 --temp_dir=...,
            with the same --environment_type choices as Flink; the job server jar comes
            from --spark_version / --spark_job_server_jar. Or start the Spark job server
            yourself and use --runner=PortableRunner --job_endpoint=HOST:8099.
  Dask      --runner=DaskRunner --dask_client_address=HOST:8786 [--dask_npartitions=N]:
            an existing dask.distributed cluster (`pip install -e ".[beam]"` brings
            dask[distributed]). The run goes through `scone_jax.beam_dask`, a fixed copy
            of Beam's DaskRunner (Beam's own drops this pipeline's counts without an
            error; see that module, also for why the Dask runner repeats work and suits
            moderate corpora only). Workers of a scheduler on 127.0.0.1/localhost (or of
            the LocalCluster Beam starts when no address is given) share this disk, so
            --temp_dir may be omitted; a scheduler on another host needs a --temp_dir
            all its workers and this process see (gs://, or a shared mount).

For example:

  python -m scone_jax.fgrams_beam --input='gs://b/train-*.txt' --input_format=text \
    --tokenizer=gs://b/tokenizer.model --output=gs://b/fgrams.npz --max_len=5 \
    --min_count=2 --num_fgrams=10000000 --num_key_shards=1024 \
    --runner=DataflowRunner --project=p --region=r --temp_location=gs://b/tmp \
    --setup_file=./pyproject.toml --worker_machine_type=n2-highmem-8

Inputs (`input_format`): every text format is read by `corpus.iter_file_documents`, the
in-process reader itself, through Beam's FileSystems: each file streamed by one worker
(memory does not grow with the file; many files parallelize, one file does not), giving
the documents and ids the in-process path gives (tests/test_corpus.py checks one corpus
in every format against both):
  'text'        UTF-8 files, optionally compressed (.gz/.zst/.bz2 by extension); documents
                are blocks separated by one or more blank lines (`corpus.split_text_documents`'
                rule, applied line by line). Ids '<basename>#<n>', n from 0.
  'jsonl'       one JSON object per line (.gz/.zst/.bz2 too), its `--text_field` ("text")
                one document; blank lines and whitespace-only texts are skipped. Ids: the
                record's "id" (as str), else '<basename>#<lineno>', lineno from 1.
  'parquet'     the `--text_field` column, by row batches; ids from an 'id' column, else
                '<basename>#<row>'.
  'arrow'       Arrow IPC files, e.g. the data-*.arrow of a `datasets.save_to_disk`
                directory (--input='DIR/*.arrow'); ids as for Parquet.
  'arrayrecord' one document per record (a JSON object like a JSONL line, or UTF-8 text).
  'auto'        each file's format by its name (`corpus.file_format`), as the in-process
                corpus.train_files reads them.
  'tokens'      `.npz` shards holding `tokens` (int32, all documents concatenated) and
                `offsets` (int64, num_docs + 1); `write_token_shards` writes them. No ids,
                so neither token shards nor a held-out split.
Text is tokenized by `tokenizer.load(...).encode(text)` (ids as encoded, nothing appended),
the tokenizer loaded once per DoFn instance in `setup()`.

Held-out documents (`--heldout_fraction=F`, default 0: every document trains): a document
whose `corpus.heldout_score(id) < F` is dropped before tokenizing, so neither the f-gram
counts nor the token shards see it. This is `corpus.split_documents`' rule except for its
guarantee of a non-empty side: in process, when no document scores below F, the lowest-
scoring one is held out anyway (and when all do, the highest-scoring one trains); that
needs a global order over the corpus, which this pipeline does not take. The two agree
whenever at least one document but not all score below F, i.e. on any corpus but a tiny
one or with a tiny F; when none does, the launcher logs a warning.

Token shards (`--shards_output=DIR`, `--num_token_shards=N`, 'text'/'jsonl' input): the
same pipeline also writes the training documents as the token shards training reads
(`scone_jax/token_shards.py`), byte for byte what `token_shards.write_shards` writes in
process for the same documents and tokenizer, so one read and one tokenization of the
text feed both the f-gram counting and the shards. Each tokenized document is keyed by
shard `doc_key(id) % N` and grouped per shard (every shard gets a group, so an empty shard
is an empty file); one worker builds a shard's bytes with `token_shards.shard_contents`
(the in-process writer's function: documents sorted by (doc_key, id), in memory, so pick
N so a shard fits a worker comfortably), and writes `tokens-SSSSS-of-NNNNN.bin` through
FileSystems under its deterministic name (a retried bundle rewrites the same file), plus
its counts in the temp directory. The launcher then writes index.json (last, so a
directory without one is unfinished): shard token counts, num_docs, num_bytes (UTF-8
text), the tokenizer fingerprint, writer 'beam', a `request` (inputs, input format,
heldout_fraction, tokenizer, N), and `docs`, a digest in shard order (`shards_digest`:
`packing.documents_digest` hashes in corpus order, a sequential hash a distributed
pipeline cannot compute without a second ordered pass). Document ids must be unique (a
duplicate fails naming the id); the f-gram counting alone does not need ids. Without
--output only the shards are written. The tokenizer is any `tokenizer.load` accepts: a
SentencePiece .model or a Hugging Face tokenizer.json (--tokenizer_kind, by the file name
when left out; --tokenizer_eos_id etc. as the config's tokenizer.eos_id). Train from them with
  --config.data.train_shards=DIR --config.tokenizer.path=TOKENIZER
  [--config.tokenizer.kind=huggingface] --config.fgrams.path=FGRAMS.npz
plus the corpus flags for the held-out split evaluation reads in process (eval files, or
the same train files and corpus.heldout_fraction=F).

The graph (one pipeline, all passes: one job start, and the runner orders the passes by
their side-input dependencies; K-1 jobs with files in between would cost a start each):
  documents (id, text) -> drop held-out -> tokenize -> Reshuffle (fusion break:
          tokenize once, rebalance), then two branches of the same PCollection:
  token shards (with --shards_output): key by shard -> GroupByKey -> sort, write
  pass 1: count tokens -> sum per key -> >= min_count -> filter_1
  pass n = 2..K: per document, the n-grams whose (n-1)-prefix AND (n-1)-suffix pass
          filter_{n-1} (a side input) -> sum per key -> >= min_count -> filter_n
  passes 2..K: each frequent batch -> one .npz (a deterministic name, so a retried
          bundle rewrites the same file instead of adding a duplicate)
Counting is batched: a counting DoFn buffers its bundle's candidate occurrences, counts
them with numpy (`np.unique` over n-gram keys = the n int32 LE tokens as one void item)
and emits (key shard, (keys, counts)) batches, shard = hash(n-gram) % num_key_shards;
CombinePerKey sums the batches of a shard (combiner lifting merges them map-side first).
This is CombinePerKey(sum) per n-gram with the n-grams of a shard carried together:
Python Beam spends microseconds per element, more than counting an n-gram costs; one
element per distinct n-gram per bundle was 2.4x slower end to end here (1M tokens,
K = 5, one DirectRunner worker: 14.8 s vs 6.1 s).

The launching process reads the shards and calls `fgrams.select_top`, then
`FGramSet.save(output_path)`. The global top-S is not taken inside Beam: it is a single
sorted list over all candidates, i.e. one worker holding millions of keys; instead each
written batch keeps only its own top `num_fgrams` (exact: under a total order the global
top S lies inside the union of the per-part top S), so the launcher reads at most
(K-1) x num_key_shards x num_fgrams rows, and never more than the frequent n-grams; it
holds them in memory, (4K + 8) bytes each.

Why the pruning filter may be approximate and the result still exact: an n-gram is
counted at all of its occurrences or at none (the filter looks only at its key), and an
n-gram whose prefix or suffix is infrequent has count < min_count (anti-monotone), so a
filter that lets a few extra keys through only costs counting work, never changes a
count or the frequent set. Two filters (`prune_filter`):
  'hashes' (default)  a sorted array of 64-bit hashes of the frequent (n-1)-grams:
                      8 bytes per frequent key, practically no false positives. The side
                      input is built on one worker and broadcast to all, so it must fit
                      in worker memory (~0.8 GB per 100M frequent (n-1)-grams), and
                      every worker reads it each pass (how well a runner caches side
                      inputs between bundles varies).
  'bloom'             a Bloom filter of 2**bloom_bits_log2 bits (default 2**30 = 128 MiB)
                      whatever the number of keys; fewer bits only means more false
                      positives (more counting), still the same result.
A join (CoGroupByKey of occurrences with the frequent set) would avoid the broadcast but
shuffle every candidate occurrence twice per pass; the Bloom filter bounds memory for
much less. Per document, a pass costs a few numpy calls (~10 us each) on top of the
work per token, so corpora of very short documents count slower per token.

IO: the launching process goes through `scone_jax.paths` (the f-gram set it writes, local
directories it creates); code that runs on workers reads inputs and writes shards through
Beam's `FileSystems`, the IO layer every runner's workers have.
"""
from scone_jax.fgrams_beam.cli import main
from scone_jax.fgrams_beam.counting import CountFrequentNGrams
from scone_jax.fgrams_beam.counting import candidate_rows
from scone_jax.fgrams_beam.counting import read_frequent as read_frequent_shards
from scone_jax.fgrams_beam.filters import PRUNE_FILTERS
from scone_jax.fgrams_beam.pipeline import run
from scone_jax.fgrams_beam.readers import INPUT_FORMATS
from scone_jax.fgrams_beam.readers import expand_input_patterns
from scone_jax.fgrams_beam.readers import read_text_documents
from scone_jax.fgrams_beam.readers import write_token_shards
