"""MSVD-QA (as Video-LLaVA evaluates it): open questions about short YouTube clips, judged by GPT
with Video-LLaVA's protocol (:mod:`ficoco.evaluation.video_qa`). lmms-eval has no MSVD-QA task;
the name ``msvd_qa`` is ficoco's.

Files: Video-LLaVA's ``MSVD_Zero_Shot_QA`` folder (``test_q.json``, ``test_a.json``, the clips in
``videos/``, ``.avi``), or a parquet with the lmms-lab video QA columns (``question``, ``answer``,
``video_name``, optional ``question_id``) and the clips extracted beside it (``videos/`` or
``YouTubeClips/``). Prompt: the question as it is (Video-LLaVA's).
"""

from __future__ import annotations

from functools import partial

from ..formats.video_llava import join_video_llava, video_llava_drafts
from ..records import Task, TaskSpec
from ..video_qa import row_builder, score_video_qa

SPEC = TaskSpec("msvd_qa", "", None, "test", "", "", ("question", "video_name"), ("answer",), "open",
                llava_files=("test_q.json",), llava_image_dirs=("videos", "YouTubeClips"), modality="video",
                max_new_tokens=64, video_dirs=("videos", "YouTubeClips"))

TASK = Task(SPEC, row_builder(lmms_eval_prompt=False), partial(score_video_qa, name="MSVD-QA"),
            join_video_llava, video_llava_drafts, scorer_fields=("raw_question",), judge="video_qa")
