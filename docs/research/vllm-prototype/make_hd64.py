"""Exact conversion of ficoco's proxy LLaVA for vLLM's CPU backend.

vLLM 0.32's CPU attention (CPU_ATTN, the only decoder backend on CPU) supports head sizes
[32, 64, 80, 96, 112, 128, ...]; the proxy's Llama has head_dim 56. Pad every head 56 -> 64 with
zeros (q/k/v rows, o_proj columns), keep RoPE on the first 56 dims via
rope_parameters.partial_rotary_factor = 56/64 (same inv_freq, same neox half-split), and fold the
softmax scale change (64**-0.5 instead of 56**-0.5) into q_proj. Also rename the vision tower keys
"vision_tower.X" -> "vision_tower.vision_model.X", the layout vLLM's CLIPVisionModel loads.
"""
import json, math, re, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

src = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vllm-proto/proxy-llava")
dst = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/vllm-proto/proxy-llava-hd64")
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
cfg = json.loads((src / "config.json").read_text())
tc = cfg["text_config"]
H, D, KV = tc["num_attention_heads"], tc["head_dim"], tc["num_key_value_heads"]
D2 = 64
sd = load_file(str(src / "model.safetensors"))
out = {}
for k, v in sd.items():
    k2 = k if "--keep-names" in sys.argv else re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", k)
    if re.search(r"language_model\.model\.layers\.\d+\.self_attn\.(q|k|v)_proj\.weight$", k):
        heads = H if ".q_proj." in k else KV
        w = v.float().view(heads, D, -1)
        if ".q_proj." in k:
            w = w * math.sqrt(D2 / D)  # vLLM scales by D2**-0.5; want D**-0.5
        pad = torch.zeros(heads, D2 - D, w.shape[-1])
        v = torch.cat([w, pad], 1).reshape(heads * D2, -1).to(v.dtype)
    elif re.search(r"self_attn\.o_proj\.weight$", k) and k.startswith("language_model"):
        w = v.float().view(v.shape[0], H, D)
        pad = torch.zeros(v.shape[0], H, D2 - D)
        v = torch.cat([w, pad], 2).reshape(v.shape[0], H * D2).to(v.dtype)
    out[k2] = v.contiguous()
save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
tc["head_dim"] = D2
rp = dict(tc.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
rp["partial_rotary_factor"] = D / D2
tc["rope_parameters"] = rp
(dst / "config.json").write_text(json.dumps(cfg, indent=2))
print("wrote", dst, "head_dim", D, "->", D2, "partial_rotary_factor", D / D2)
