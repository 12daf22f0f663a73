"""Evaluation on the paper's benchmarks (issue 5): data readers and official scoring.

Laid out as lmms-eval's tasks, from the bottom up (each module imports only those above it):

* :mod:`.records` -- :class:`Record`, :class:`TaskSpec`, :class:`Task`, :class:`BenchmarkDataError`;
* :mod:`.formats` -- the on-disk forms (parquet, ``save_to_disk``, LLaVA files, MMBench tsv) and
  image decoding;
* :mod:`.metrics`, :mod:`.vqa_eval` -- scoring shared by several benchmarks (option letters,
  multiple choice, exact match, VQA accuracy);
* :mod:`.tasks` -- one module per benchmark (its spec, row builder, LLaVA join, answer parsing
  and scorer) and the registry (``TASKS``, ``SCORERS``);
* :mod:`.read` -- :func:`read_benchmark`; :mod:`.runner`, :mod:`.report`, :mod:`.prompt_format`,
  :mod:`.lmms_eval_plugin` -- ``ficoco eval`` and lmms-eval.
"""
