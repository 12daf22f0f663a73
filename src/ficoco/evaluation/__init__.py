"""Evaluation on the paper's benchmarks (issue 5): data readers and official scoring.

Laid out as lmms-eval's tasks, from the bottom up (each module imports only those above it):

* :mod:`.records` -- :class:`Record`, :class:`TaskSpec`, :class:`Task`, :class:`BenchmarkDataError`;
* :mod:`.formats` -- the on-disk forms (parquet, ``save_to_disk``, LLaVA files, MMBench tsv,
  Video-LLaVA's video QA files), image decoding and video files (PyAV);
* :mod:`.metrics`, :mod:`.vqa_eval`, :mod:`.video_qa` -- scoring shared by several benchmarks
  (option letters, multiple choice, exact match, VQA accuracy, Video-LLaVA's GPT judge protocol);
* :mod:`.tasks` -- one module per benchmark (its spec, row builder, LLaVA join, answer parsing
  and scorer) and the registry (``TASKS``, ``SCORERS``);
* :mod:`.read` -- :func:`read_benchmark`; :mod:`.video_frames`, :mod:`.model_inputs` -- which
  frames of a video each family is shown, and a batch of samples as a model's inputs;
  :mod:`.runner`, :mod:`.report`, :mod:`.prompt_format`, :mod:`.lmms_eval_plugin` -- ``ficoco
  eval`` and lmms-eval.
"""
