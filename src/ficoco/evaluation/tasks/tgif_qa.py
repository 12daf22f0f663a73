"""TGIF-QA (the zero-shot QA set Video-LLaVA evaluates): open questions about animated GIFs, judged by
GPT with Video-LLaVA's protocol (:mod:`ficoco.evaluation.video_qa`). lmms-eval has no TGIF-QA
task; the name ``tgif_qa`` is ficoco's.

Files: Video-LLaVA's ``TGIF_Zero_Shot_QA`` folder (``test_q.json``, ``test_a.json``, the videos
in ``mp4/``), or a parquet with the lmms-lab video QA columns (``question``, ``answer``,
``video_name``, optional ``question_id``) and the videos extracted beside it (``mp4/``,
``videos/`` or ``gifs/``; ``.gif`` files are read too). Prompt: the question as it is (Video-LLaVA's).
"""

from __future__ import annotations

from functools import partial

from ..formats.video_llava import join_video_llava, video_llava_drafts
from ..records import Task, TaskSpec
from ..video_qa import row_builder, score_video_qa

SPEC = TaskSpec("tgif_qa", "", None, "test", "", "", ("question", "video_name"), ("answer",), "open",
                llava_files=("test_q.json",), llava_image_dirs=("mp4", "videos", "gifs"), modality="video",
                max_new_tokens=64, video_dirs=("mp4", "videos", "gifs"))

TASK = Task(SPEC, row_builder(lmms_eval_prompt=False), partial(score_video_qa, name="TGIF-QA"),
            join_video_llava, video_llava_drafts, scorer_fields=("raw_question",), judge="video_qa")
