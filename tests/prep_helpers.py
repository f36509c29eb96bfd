"""Helpers shared by the preparation and fault-injection tests."""

import csv
import glob
import os

from data_prep import featurize
from data_prep import inputs
from data_prep import prepare

ESC_CLIPS = ["001 - Dog bark/1-100032-A.ogg", "001 - Dog bark/1-110389-A.ogg",
             "002 - Rain/1-17367-A.ogg", "002 - Rain/1-21189-A.ogg",
             "005 - Clock tick/1-21934-A.ogg"]


def write_list(path, rows, header=("path", "labels")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def read_manifest(out):
  with open(os.path.join(out, "manifest.csv")) as f:
    return list(csv.DictReader(f))


def shard_bytes(out):
  return {os.path.basename(p): open(p, "rb").read()
          for p in sorted(glob.glob(os.path.join(out, "*.tfrecord")))}


def run_prepare(file_list, out, num_workers=0, **kw):
  found = inputs.from_file_list(file_list)
  config = featurize.PrepareConfig(output_dir=str(out), **kw)
  return prepare.prepare(found, config, num_workers=num_workers, progress_every=0)
