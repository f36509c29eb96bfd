"""The local runner: `ClipJob`s -> sharded TFRecords + manifest on one machine.

Worker processes (``num_workers=0`` runs in-process, e.g. for a GPU embedder) run
`featurize.ClipProcessor` on each clip: decode, log-mel front end, frame embeddings, one
serialized Example. The main process writes the shards in input order with
`shards.ShardWriter`, so a run is deterministic. The plan, resume, duplicate checks and
accounting are `shards.start_run` and `shards.finalize`, the same steps the Beam pipeline
(data_prep/beam_prepare.py) takes; see data_prep/shards.py.
"""

import multiprocessing
import os
import time

from absl import logging
import tensorflow as tf

from av_sound_tf.core import progress as progress_lib
from data_prep import featurize
from data_prep import inputs as inputs_lib
from data_prep import shards

_WORKER = None


def clip_threads(num_workers: int, cpus: int) -> int:
  """`featurize.ClipProcessor`'s threads: 1 (each clip on its worker's one thread, the
  least CPU per clip) when the workers already occupy every core, else 0 (helper threads
  for the audio and the frame conversion, FFmpeg's automatic decoder threads), so that
  fewer workers than cores (or preparation in this process, num_workers=0) still use the
  idle cores (docs/benchmarks.md: more CPU, less wall time)."""
  return 1 if num_workers >= max(1, cpus) else 0


def _init_worker(config, threads):
  global _WORKER
  # One thread per worker process: the parallelism comes from the processes.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  _WORKER = featurize.ClipProcessor(config, threads)


def _work(job):
  return _WORKER(job)


def prepare(inputs: inputs_lib.Inputs, config: featurize.PrepareConfig, num_workers: int = 2,
            overwrite: bool = False, progress_every: float = 5.0,
            fingerprint_content: bool = True) -> shards.Summary:
  """Writes sharded TFRecords, the manifest and the dataset info for `inputs`.

  Args:
    inputs: the jobs and list problems (see data_prep.inputs).
    config: what to compute.
    num_workers: worker processes; 0 runs in this process.
    overwrite: delete an existing run in config.output_dir first.
    progress_every: seconds between progress lines.
    fingerprint_content: also find byte-identical copies under other names (see
      `inputs.mark_duplicates`); False compares resolved paths only (benchmarks).

  Returns:
    A `shards.Summary`.

  Raises:
    inputs.SplitLeakError: a recording would land in two splits (nothing is written).
  """
  t0 = time.time()
  out = config.output_dir
  plan, shard_names, pending, skipped = shards.start_run(inputs, config, overwrite,
                                                         fingerprint_content)
  total = len(inputs.jobs)
  progress = progress_lib.Progress(total, already_done=total - len(pending),
                                   every=progress_every)
  logging.info("[prepare] %d inputs, %d to process (%d complete shards kept), %d workers",
               total, len(pending), skipped, num_workers)

  pool = None
  threads = clip_threads(num_workers, os.cpu_count() or 1)
  if num_workers > 0 and pending:
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(config, threads))
    results = pool.imap(_work, [job for job, _ in pending], chunksize=2)
  else:
    processor = featurize.ClipProcessor(config, threads)
    results = (processor(job) for job, _ in pending)

  writer = None
  try:
    for (job, name), result in zip(pending, results):
      if writer is None or writer.name != name:
        if writer is not None:
          writer.close()
        writer = shards.ShardWriter(out, name)
      writer.add(job, result)
      progress.update(failed=result.status != "written")
    progress.finish()
    if writer is not None:
      writer.close()
      writer = None
  finally:
    if writer is not None:
      writer.abandon()
    if pool is not None:
      pool.terminate()
      pool.join()

  return shards.finalize(inputs, config, plan, shard_names, skipped, t0, progress.rate())
