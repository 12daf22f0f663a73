"""The on-disk forms a benchmark can take, read by :func:`~ficoco.evaluation.read.read_benchmark`.

* ``parquet``    -- a local copy of the lmms-lab Hugging Face dataset that lmms-eval uses (a
  folder of parquet shards such as ``data/test-00000-of-00003.parquet`` or
  ``<config>/<split>-*.parquet``, or a single parquet file): :mod:`.files` finds the shards of a
  split, :mod:`.tables` reads their rows;
* ``hf_disk``    -- a folder written by ``datasets.Dataset(Dict).save_to_disk`` (read with
  ``datasets.load_from_disk`` when ``datasets`` is importable, otherwise its Arrow files are
  read with pyarrow directly): :mod:`.tables`;
* ``llava``      -- LLaVA-1.5's evaluation files: a question ``.jsonl`` (ScienceQA: ``.json``)
  plus an image folder, with the ground-truth files LLaVA's scripts use where they exist:
  :mod:`.llava` (each task joins its own ground truth);
* ``tsv``        -- MMBench's ``.tsv`` with base64 images: :mod:`.tsv`;
* ``mme_folder`` -- the ``MME_Benchmark_release_version`` folder: read by
  :mod:`ficoco.evaluation.tasks.mme`, the one task that has it.

The video QA benchmarks' ``llava`` form is Video-LLaVA's ``test_q.json`` / ``test_a.json``
(:mod:`.video_llava`); their videos are files in an extracted folder (:mod:`.videos`).

Images are decoded lazily (:mod:`.images`), videos only when a model reads their frames.  Nothing here knows a particular benchmark: what a
row means is the task's ``build_row`` (:mod:`ficoco.evaluation.tasks`).
"""

FORMATS = ("parquet", "hf_disk", "llava", "tsv", "mme_folder")
