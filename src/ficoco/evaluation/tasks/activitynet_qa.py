"""ActivityNet-QA (lmms-eval ``activitynetqa``): open questions about long YouTube activity
videos, judged by GPT with Video-LLaVA's protocol (:mod:`ficoco.evaluation.video_qa`).

Files: lmms-lab/ActivityNetQA (``data/test-*.parquet``: ``question_id``, ``question``, ``answer``,
``video_name``, ``type``) with its ``all_test.zip`` extracted to ``all_test/`` (videos
``v_<video_name>.mp4`` / ``.webm`` / ``.mkv``); or Video-LLaVA's ``Activitynet_Zero_Shot_QA``
folder (``test_q.json``, ``test_a.json``, ``all_test/``). Prompt: lmms-eval's for the parquet
(the question capitalised with a question mark, then " Answer the question using a single word or
phrase."), Video-LLaVA's (the question as it is) for its files. Scores: accuracy and mean score,
also per question type.
"""

from __future__ import annotations

from functools import partial

from ..formats.video_llava import join_video_llava, video_llava_drafts
from ..records import Task, TaskSpec
from ..video_qa import row_builder, score_video_qa

#: lmms-eval's post-prompt for ActivityNet-QA (a space, not a new line, before it)
ACTIVITYNET_POST = " Answer the question using a single word or phrase."

SPEC = TaskSpec("activitynetqa", "lmms-lab/ActivityNetQA", None, "test", "", ACTIVITYNET_POST,
                ("question", "video_name"), ("answer",), "open",
                llava_files=("test_q.json",), llava_image_dirs=("all_test", "videos"), modality="video",
                max_new_tokens=64, video_dirs=("all_test", "videos"), video_prefixes=("v_", ""))

TASK = Task(SPEC, row_builder(lmms_eval_prompt=True), partial(score_video_qa, name="ActivityNet-QA"),
            join_video_llava, video_llava_drafts, scorer_fields=("raw_question", "type"), judge="video_qa")
