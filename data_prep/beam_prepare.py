"""Data preparation as an Apache Beam pipeline (Dataflow, Flink, Spark or the DirectRunner).

The same library code as the local runner (data_prep/prepare.py): the per-clip work of
data_prep/featurize.py and the shard bookkeeping of data_prep/shards.py, arranged as:

  launcher:  read the list (data_prep.inputs) -> plan shards (shards.start_run: the same
             duplicate and split-leak checks, the same deterministic assignment of clips
             to shards, verified shards of an earlier run kept, damaged ones redone)
             -> write the pending jobs to <output_dir>/.beam/jobs-*.jsonl
  pipeline:  ReadFromText(jobs) -> ParDo(ProcessClip)   decode, log-mel, frame embeddings;
                                                        the embedder is built once per
                                                        worker in DoFn.setup; a Beam
                                                        counter per outcome / failure kind
             -> GroupByKey(shard name) -> ParDo(WriteShard)   one shards.ShardWriter per
                                                        shard: clips sorted by input
                                                        position, one per input position
             + failed clips -> WriteToText(<output_dir>/failed/failed-*.csv) (dead letters)
  launcher:  shards.finalize (manifest.csv, the dataset info), counters, summary.

Exactly once: a retried ProcessClip bundle can emit a clip twice; WriteShard keeps one
record per input position (a duplicate row of the list is its own input, failed by
inputs.mark_duplicates, and may share its clip id with the first row). A retried
WriteShard rewrites the whole shard to ``.incomplete`` and renames it, so the result is the
same bytes. The shards are therefore byte-identical to the local runner's
(tests/beam_prepare_test.py checks it).

Why not ``beam.io.WriteToTFRecord``: it decides which records land in which file from the
bundle layout, so its shards differ between runs and retries, a resumed run cannot keep
finished shards, and the per-shard manifest (the resume commit mark) cannot be written.
Grouping by the planned shard name gives all three at the cost of one shuffle of the
examples (about 128 KB per 10 s clip).
"""

import csv
import dataclasses
import io
import json
import os
import time
from typing import Any, Tuple

from absl import logging
import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
import tensorflow as tf

from av_sound_tf.core import progress as progress_lib
from data_prep import featurize
from data_prep import inputs as inputs_lib
from data_prep import shards

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner",
           "PortableRunner")
BEAM_DIR = ".beam"
DEAD_LETTER_DIR = "failed"
COUNTER_NAMESPACE = "av_sound_tf.prepare"


def _job_to_json(job, shard):
  return json.dumps({"shard": shard, "job": dataclasses.asdict(job)})


def _job_from_json(line):
  d = json.loads(line)
  return d["shard"], inputs_lib.ClipJob(**d["job"])


@beam.typehints.with_output_types(Tuple[str, Any])
class ProcessClip(beam.DoFn):
  """Decodes and featurizes one clip; emits (shard, (job, result))."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    self.processor = None

  def setup(self):
    # One thread per worker process: Beam parallelizes over processes and workers. Where
    # TensorFlow already runs in this process (the in-memory DirectRunner, --num_workers=1,
    # inside a launcher that has read shards back), its thread settings stay as they are.
    try:
      tf.config.threading.set_intra_op_parallelism_threads(1)
      tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # "cannot be modified after initialization"
      pass
    self.processor = featurize.ClipProcessor(self.config)
    if self.config.visual:  # the embedder (a TFLite interpreter, ResNet-152) once per DoFn
      _ = self.processor.embedder  # instance, here rather than on its first clip
    self.progress = progress_lib.Progress(None, every=30.0)  # per worker, in the worker's log

  def process(self, line):
    shard, job = _job_from_json(line)
    result = self.processor(job)
    self.progress.update(failed=result.status != "written")
    if result.status == "written":
      Metrics.counter(COUNTER_NAMESPACE, "written").inc()
    else:
      Metrics.counter(COUNTER_NAMESPACE, "failed: " + shards.reason_kind(result.reason)).inc()
      yield beam.pvalue.TaggedOutput("failed", (job.path, result.reason))
    yield shard, (job, result)


class WriteShard(beam.DoFn):
  """Writes one planned shard from its grouped clips (idempotent, see the module doc)."""

  def __init__(self, output_dir):
    super().__init__()
    self.output_dir = output_dir

  def process(self, element):
    shard, items = element
    unique = {}
    for job, result in items:
      if job.index in unique:
        Metrics.counter(COUNTER_NAMESPACE, "duplicates dropped (retried bundles)").inc()
      unique[job.index] = (job, result)
    writer = shards.ShardWriter(self.output_dir, shard)
    for job, result in sorted(unique.values(), key=lambda t: t[0].index):  # input order
      writer.add(job, result)
    writer.close()
    Metrics.counter(COUNTER_NAMESPACE, "shards written").inc()
    yield shard


def _csv_line(path, reason):
  buf = io.StringIO()
  csv.writer(buf, lineterminator="").writerow([path, reason])
  return buf.getvalue()


def build_pipeline(pipeline, jobs_pattern, config):
  """Adds the preparation transforms to `pipeline`; returns the written-shards PCollection."""
  results = (pipeline
             | "ReadJobs" >> beam.io.ReadFromText(jobs_pattern)
             | "Reshuffle" >> beam.Reshuffle()  # spread the clips over all workers
             | "ProcessClip" >> beam.ParDo(ProcessClip(config)).with_outputs(
                 "failed", main="clips"))
  _ = (results.failed
       | "FormatFailed" >> beam.MapTuple(_csv_line)
       | "DeadLetters" >> beam.io.WriteToText(
           os.path.join(config.output_dir, DEAD_LETTER_DIR, "failed"), file_name_suffix=".csv",
           header="path,reason"))
  return (results.clips
          | "GroupByShard" >> beam.GroupByKey()
          | "WriteShard" >> beam.ParDo(WriteShard(config.output_dir)))


def pipeline_options(runner, beam_args=(), num_workers=2):
  if runner not in RUNNERS:
    raise ValueError(f"Unknown Beam runner {runner!r}; use one of {RUNNERS}.")
  args = [f"--runner={runner}", *beam_args]
  if runner == "DirectRunner" and not any(a.startswith("--direct_num_workers") for a in args):
    args += [f"--direct_num_workers={max(1, num_workers)}",
             "--direct_running_mode=" + ("multi_processing" if num_workers > 1 else
                                         "in_memory")]
  return PipelineOptions(args)


def prepare_with_beam(inputs, config, runner="DirectRunner", beam_args=(), num_workers=2,
                      overwrite=False, jobs_per_file=10000, log=logging.info):
  """Runs preparation on a Beam runner and waits for it; returns a shards.Summary.

  Args:
    inputs: the jobs and list problems (data_prep.inputs).
    config: featurize.PrepareConfig; output_dir may be gs:// (any tf.io.gfile path).
    runner: a Beam runner name.
    beam_args: extra Beam pipeline flags, e.g. ("--project=p", "--region=r",
      "--temp_location=gs://b/tmp", "--setup_file=./setup.py") for Dataflow.
    num_workers: DirectRunner processes (other runners size themselves from beam_args).
    overwrite: delete an existing run in config.output_dir first.
    jobs_per_file: jobs per JSON-lines input file (several files let ReadFromText split).
  """
  t0 = time.time()
  plan, shard_names, pending, skipped = shards.start_run(inputs, config, overwrite)
  beam_dir = tf.io.gfile.join(config.output_dir, BEAM_DIR)
  if tf.io.gfile.exists(beam_dir):
    tf.io.gfile.rmtree(beam_dir)
  tf.io.gfile.makedirs(beam_dir)
  dead = tf.io.gfile.join(config.output_dir, DEAD_LETTER_DIR)
  if tf.io.gfile.exists(dead):
    tf.io.gfile.rmtree(dead)
  log(f"[prepare] Beam {runner}: {len(inputs.jobs)} inputs, {len(pending)} to process "
      f"({skipped} complete shards kept)")
  counters = {}
  if pending:
    for start in range(0, len(pending), jobs_per_file):
      lines = [_job_to_json(job, shard)
               for job, shard in pending[start:start + jobs_per_file]]
      with tf.io.gfile.GFile(tf.io.gfile.join(
          beam_dir, f"jobs-{start // jobs_per_file:05d}.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    p = beam.Pipeline(options=pipeline_options(runner, beam_args, num_workers))
    build_pipeline(p, tf.io.gfile.join(beam_dir, "jobs-*.jsonl"), config)
    result = p.run()
    result.wait_until_finish()
    counters = _counters(result)
    for name, value in sorted(counters.items()):
      log(f"[prepare] counter {name}: {value}")
  missing = [name for name in shard_names.values()
             if not tf.io.gfile.exists(tf.io.gfile.join(config.output_dir, name))]
  if missing:
    raise RuntimeError(f"The Beam pipeline finished without writing {len(missing)} shard(s), "
                       f"e.g. {missing[0]}; rerun the same command to redo them.")
  elapsed = max(time.time() - t0, 1e-9)
  summary = shards.finalize(inputs, config, plan, shard_names, skipped, t0,
                             len(pending) / elapsed)
  summary.counters = counters
  return summary


def _counters(result):
  try:
    query = result.metrics().query()
  except Exception:  # pylint: disable=broad-except
    return {}
  out = {}
  for c in query.get("counters", []):
    if c.key.metric.namespace == COUNTER_NAMESPACE:
      out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
  return out
