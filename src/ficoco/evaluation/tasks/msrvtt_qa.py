"""MSRVTT-QA (as Video-LLaVA evaluates it): open questions about MSR-VTT's web videos, judged by
GPT with Video-LLaVA's protocol (:mod:`ficoco.evaluation.video_qa`). lmms-eval has no MSRVTT-QA
task; the name ``msrvtt_qa`` is ficoco's.

Files: Video-LLaVA's ``MSRVTT_Zero_Shot_QA`` folder (``test_q.json``, ``test_a.json``, the videos
in ``videos/all/``), or a parquet with the lmms-lab video QA columns (``question``, ``answer``,
``video_name``, optional ``question_id``) and the videos extracted beside it (``videos/all/``,
``videos/`` or ``TestVideo/``). Prompt: the question as it is (Video-LLaVA's).
"""

from __future__ import annotations

from functools import partial

from ..formats.video_llava import join_video_llava, video_llava_drafts
from ..records import Task, TaskSpec
from ..video_qa import row_builder, score_video_qa

SPEC = TaskSpec("msrvtt_qa", "", None, "test", "", "", ("question", "video_name"), ("answer",), "open",
                llava_files=("test_q.json",), llava_image_dirs=("videos/all", "videos", "TestVideo"),
                modality="video", max_new_tokens=64, video_dirs=("videos/all", "videos", "TestVideo"))

TASK = Task(SPEC, row_builder(lmms_eval_prompt=False), partial(score_video_qa, name="MSRVTT-QA"),
            join_video_llava, video_llava_drafts, scorer_fields=("raw_question",), judge="video_qa")
